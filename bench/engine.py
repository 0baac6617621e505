"""Training-engine throughput and memory benchmark (not a test). Run from the repo root:

    .venv/bin/python bench/engine.py [--rounds 3] [--epochs 2]

On cifar10-mini/train (5,000 32x32 images), model tudui, batch 64, it measures images/s of

  tutorial  the seed tutorial's loop: ImageFolder + ToTensor + DataLoader(shuffle=True, batch 64)
            + SGD(lr 0.01), decoding every JPEG every epoch
  engine    engine.fit (the default recipe: augmentation on the device, fused normalization,
            channels_last, fp32) - its train_images_per_second, evaluation excluded
  ceiling   the same model + optimizer + loss, forward + backward + step on preloaded,
            normalized float batches in a tight loop (same precision and memory format)

and, in a subprocess, the peak RSS of fit() on 50,000 32x32 images (the 5,000 tiled 10x).
The machine is shared, so each figure is the best of `--rounds` interleaved rounds.
The last line is `R1=<engine/tutorial> R2=<engine/ceiling> peak_rss_mb=<MB>`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionflow import engine  # noqa: E402
from visionflow.cache import DecodedSplit, load_decoded  # noqa: E402
from visionflow.config import PipelineConfig, build_config  # noqa: E402
from visionflow.data import resolve_dataset  # noqa: E402
from visionflow.models import ModelSpec, build_model  # noqa: E402
from visionflow.transforms import BatchTransform, mean_std  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cifar10-mini"
BATCH = 64
MODEL = "tudui"
RSS_IMAGES = 50_000


def _config(epochs: int) -> PipelineConfig:
    return build_config({"model": {"name": MODEL}, "data": {"batch_size": BATCH},
                         "training": {"epochs": epochs, "device": "cpu", "precision": "fp32", "channels_last": True}})


def _decoded() -> tuple[DecodedSplit, DecodedSplit]:
    info = resolve_dataset(str(DATA), download=False)
    cache = REPO / "data" / "cache"
    return load_decoded(info.train, 32, cache), load_decoded(info.eval_split, 32, cache)


def _spec(train: DecodedSplit) -> ModelSpec:
    return ModelSpec(MODEL, len(train.classes), 32, list(train.classes))


def tutorial_images_per_second() -> float:
    """One epoch of the tutorial's loop, JPEG decoding included."""
    dataset = torchvision.datasets.ImageFolder(str(DATA / "train"), transform=T.ToTensor())
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    model = build_model(MODEL, len(dataset.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    start, images = time.perf_counter(), 0
    for inputs, labels in loader:
        loss = loss_fn(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images += len(labels)
    return images / (time.perf_counter() - start)


def engine_images_per_second(train: DecodedSplit, val: DecodedSplit, epochs: int) -> float:
    """engine.fit's training throughput in the last epoch (the first one also warms oneDNN up)."""
    engine.seed_everything(0)
    model = build_model(MODEL, len(train.classes))
    result = engine.fit(model, train, val, _config(epochs), _spec(train))
    return result.history[-1].images_per_second


def ceiling_images_per_second(train: DecodedSplit, epochs: int) -> float:
    """Forward + backward + step only, on batches prepared beforehand, as many as the engine trains."""
    config = _config(epochs).resolved()
    mean, std = mean_std(train.images)
    prepare = BatchTransform(mean, std, "cpu", channels_last=True)
    batches = [(prepare(x), y) for x, y in zip(train.images.split(BATCH), train.labels.split(BATCH))]
    model = build_model(MODEL, len(train.classes)).to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, config.optim)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    seconds = 0.0
    for _ in range(epochs):  # same warm-up as the engine: report the last epoch
        start = time.perf_counter()
        for inputs, labels in batches:
            loss = loss_fn(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
    return len(train.labels) / seconds


def peak_rss_child() -> None:
    """Subprocess body: fit one epoch on 50,000 images (tiled); print ru_maxrss in MB as JSON."""
    train, val = _decoded()
    repeats = -(-RSS_IMAGES // len(train.labels))
    big = SimpleNamespace(images=train.images.repeat(repeats, 1, 1, 1)[:RSS_IMAGES],  # (50000, 3, 32, 32) uint8
                          labels=train.labels.repeat(repeats)[:RSS_IMAGES], classes=train.classes)
    del train
    engine.seed_everything(0)
    result = engine.fit(build_model(MODEL, len(big.classes)), big, val, _config(1), _spec(big))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"peak_rss_mb": peak_mb, "images": len(big.labels),
                      "images_per_second": result.train_images_per_second}))


def peak_rss_mb() -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (best is kept)")
    parser.add_argument("--epochs", type=int, default=2, help="engine/ceiling epochs per round (last one timed)")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child()
    train, val = _decoded()
    best = {"tutorial": 0.0, "engine": 0.0, "ceiling": 0.0}
    for round_ in range(1, args.rounds + 1):
        figures = {"tutorial": tutorial_images_per_second(),
                   "engine": engine_images_per_second(train, val, args.epochs),
                   "ceiling": ceiling_images_per_second(train, args.epochs)}
        best = {k: max(best[k], v) for k, v in figures.items()}
        print(f"round {round_}: " + "  ".join(f"{k} {v:,.0f} img/s" for k, v in figures.items()), flush=True)
    rss = peak_rss_mb()
    print(f"best: tutorial {best['tutorial']:,.0f}  engine {best['engine']:,.0f}  ceiling {best['ceiling']:,.0f} img/s; "
          f"fit on {rss['images']:,} images: peak RSS {rss['peak_rss_mb']:.0f} MB, {rss['images_per_second']:,.0f} img/s")
    print(f"R1={best['engine'] / best['tutorial']:.2f} R2={best['engine'] / best['ceiling']:.2f} "
          f"peak_rss_mb={rss['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
