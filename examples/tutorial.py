"""The PyTorch tutorial visionflow grew from, step by step, with visionflow's pieces.

    python examples/tutorial.py --folders data/hymenoptera_data/train --out tutorial-out \\
        [--cifar-url http://mirror.example/cifar-10-python.tar.gz]

1. A folder per label: `LabelFolder` (the tutorial's `Mydata`); `ants + bees` concatenates.
2. CIFAR-10: `prepare_cifar10` downloads (from --cifar-url, e.g. a local mirror), verifies and
   converts it once; `FolderDataset` reads a split (torchvision's `CIFAR10`).
3. Transforms: `mean_std` of the train split, then `eval_pipeline` (Compose of Resize, ToTensor,
   Normalize).
4. DataLoader knobs: batch_size, shuffle, num_workers, drop_last.
5. SummaryWriter: ten train images and `y=2x` in --out/tensorboard, then the training loss and the
   model graph (`log_model_graph`).
6. conv/pool/linear: `F.conv2d` on the tutorial's 5x5 input, the tutorial's CIFAR-10 network
   (`build_model("tudui")`) layer by layer (`summarize`), a few SGD steps.
7. Both ways to save and load: the whole module (`save_whole_module`/`load_whole_module`, which
   needs trust) and the state_dict (`save_state_dict`/`load_state_dict`); both predict the same.

docs/guides/tutorial.md maps each step to the module that owns it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader
from torch.utils.tensorboard import SummaryWriter

from visionflow.checkpoints import load_state_dict, load_whole_module, save_state_dict, save_whole_module
from visionflow.data.decoded import decode_split
from visionflow.data.download import CIFAR10_MD5, CIFAR10_URL, prepare_cifar10
from visionflow.data.folders import FolderDataset, LabelFolder
from visionflow.data.splits import DatasetInfo, resolve_folder
from visionflow.data.transforms import eval_pipeline, mean_std
from visionflow.errors import VisionflowError
from visionflow.models import build_model, summarize
from visionflow.tensorboard import log_model_graph

IMAGE_SIZE = 32  # CIFAR-10's size, the input of the tutorial's network
LEARNING_RATE = 0.01  # the tutorial's SGD learning rate
SHOWN_IMAGES = 10  # the tutorial logs the first ten train images

Transform = Callable[[Image.Image], torch.Tensor]


def folder_per_label(root: Path, labels: list[str]) -> ConcatDataset:
    """Step 1: one LabelFolder per label folder, concatenated with `+` as in the tutorial."""
    datasets = [LabelFolder(root, label) for label in labels]
    both = sum(datasets[1:], datasets[0])  # Dataset + Dataset is a ConcatDataset
    image, label = both[len(both) - 1]
    sizes = ", ".join(f"{d.label_dir} {len(d)}" for d in datasets)
    print(f"[1 folders] {sizes}; concatenated {len(both)}; last item: label {label!r}, PIL image {image.size}")
    return both


def cifar10(data_dir: Path, url: str, md5: str) -> DatasetInfo:
    """Step 2: download (or reuse) the archive, convert it to PNG folders once, resolve its splits."""
    info = resolve_folder(prepare_cifar10(data_dir, url=url, md5=md5), "cifar10")
    counts = ", ".join(f"{name} {len(split)}" for name, split in info.splits.items())
    print(f"[2 cifar10] {len(info.classes)} classes: {', '.join(info.classes)}; {counts}")
    return info


def pipeline(info: DatasetInfo, photo: Image.Image) -> Transform:
    """Step 3: Normalize's statistics measured on the train split, then the Compose pipeline."""
    mean, std = mean_std(decode_split(info.train, IMAGE_SIZE, fingerprint="tutorial").images)
    transform = eval_pipeline(IMAGE_SIZE, mean, std)
    stats = f"mean {[round(m, 3) for m in mean]}, std {[round(s, 3) for s in std]}"
    print(f"[3 transforms] {stats}; a {photo.size} photo becomes a {tuple(transform(photo).shape)} tensor")
    return transform


def loader(info: DatasetInfo, transform: Transform, batch_size: int, num_workers: int) -> DataLoader:
    """Step 4: the DataLoader knobs over the train split; a seeded generator makes shuffle repeatable."""
    data = DataLoader(
        FolderDataset(info.train, transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    images, targets = next(iter(data))
    first = f"images {tuple(images.shape)}, targets {targets[:8].tolist()}"
    print(f"[4 dataloader] {len(data)} batches of {batch_size}; first batch: {first}")
    return data


def write_tutorial_logs(writer: SummaryWriter, info: DatasetInfo) -> None:
    """Step 5: the tutorial's images (HWC arrays, as from PIL) and its y=2x curve."""
    train = FolderDataset(info.train)
    for i in range(min(SHOWN_IMAGES, len(train))):
        image, _ = train[i]
        writer.add_image("cifar10/train", np.asarray(image), i, dataformats="HWC")
    for i in range(100):
        writer.add_scalar("y=2x", 2 * i, i)
    print(f"[5 tensorboard] images and y=2x in {writer.log_dir}")


def convolution() -> None:
    """Step 6a: the tutorial's 5x5 input and 3x3 kernel through F.conv2d: stride 1, stride 2, padding 1."""
    image = torch.tensor([[1, 2, 0, 3, 1], [0, 1, 2, 3, 1], [1, 2, 1, 0, 3], [5, 2, 3, 1, 1], [2, 1, 0, 1, 1]])
    kernel = torch.tensor([[1, 2, 1], [0, 1, 0], [2, 1, 0]])
    image, kernel = image.reshape(1, 1, 5, 5), kernel.reshape(1, 1, 3, 3)  # (batch, channels, H, W)
    for knobs in ({"stride": 1}, {"stride": 2}, {"stride": 1, "padding": 1}):
        print(f"[6 conv2d] {knobs}: {F.conv2d(image, kernel, **knobs)[0, 0].tolist()}")


def train(model: nn.Module, data: DataLoader, steps: int, writer: SummaryWriter) -> None:
    """Step 6b: up to `steps` SGD steps (one pass at most) of the tutorial's network, the loss in TensorBoard."""
    print(summarize(model, IMAGE_SIZE).to_text())
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    model.train()
    for step, (images, targets) in zip(range(steps), data):
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        writer.add_scalar("loss/train", loss.item(), step)
    print(f"[6 train] {step + 1} SGD steps, last loss {loss.item():.4f}")


def save_and_load(model: nn.Module, info: DatasetInfo, transform: Transform, out: Path, batch_size: int) -> None:
    """Step 7: the whole module and the state_dict, saved, loaded back and compared on an eval batch."""
    whole_file, weights_file = out / "tudui_whole.pth", out / "tudui_state_dict.pth"
    whole = load_whole_module(save_whole_module(model, whole_file), trust=True)  # trusted: written just now
    weights = load_state_dict(build_model("tudui", len(info.classes)), save_state_dict(model, weights_file))
    images, _ = next(iter(DataLoader(FolderDataset(info.eval_split, transform), batch_size=batch_size)))
    with torch.no_grad():
        predictions = [net.eval()(images).argmax(1) for net in (model, whole, weights)]
    same = all(torch.equal(predictions[0], other) for other in predictions[1:])
    print(f"[7 save/load] {whole_file.name} and {weights_file.name}: same predictions on {len(images)} images: {same}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folders", type=Path, default=Path("data/hymenoptera_data/train"), help="one folder per label"
    )
    parser.add_argument("--labels", nargs="+", default=["ants", "bees"], help="label folders inside --folders")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="CIFAR-10 goes to DATA_DIR/cifar10")
    parser.add_argument("--cifar-url", default=CIFAR10_URL, help="where to download CIFAR-10 from (a mirror)")
    parser.add_argument("--cifar-md5", default=CIFAR10_MD5, help="md5 of the archive at --cifar-url")
    parser.add_argument("--out", type=Path, default=Path("tutorial-out"), help="TensorBoard logs and saved models")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (0: this one)")
    parser.add_argument("--steps", type=int, default=20, help="SGD steps of step 6 (one pass at most)")
    args = parser.parse_args(argv)
    try:
        photos = folder_per_label(args.folders, args.labels)
        info = cifar10(args.data_dir, args.cifar_url, args.cifar_md5)
        transform = pipeline(info, photos[0][0])
        data = loader(info, transform, args.batch_size, args.num_workers)
        model = build_model("tudui", len(info.classes))
        with SummaryWriter(str(args.out / "tensorboard")) as writer:
            write_tutorial_logs(writer, info)
            convolution()
            train(model, data, args.steps, writer)
        log_model_graph(args.out / "tensorboard", model, IMAGE_SIZE)
        save_and_load(model, info, transform, args.out, args.batch_size)
    except VisionflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
