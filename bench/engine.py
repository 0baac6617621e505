"""Training-engine throughput and memory benchmark (not a test). Run from the repo root:

    .venv/bin/python bench/engine.py [--device auto|cpu|cuda|cuda:N] [--rounds 15] [--precision auto|fp32|bf16]
                                     [--channels-last auto|true|false]

On cifar10-mini/train (5,000 32x32 images), model tudui, batch 64, on --device (default auto,
as training.device: cuda, then mps, then cpu), it measures images/s of

  tutorial  the seed tutorial's loop: ImageFolder + ToTensor + DataLoader(shuffle=True, batch 64)
            + SGD(lr 0.01), decoding every JPEG as it goes (on a GPU as the tutorial's GPU
            section does it: model and each batch moved with .to(device))
  engine    engine.fit with the product's defaults: the default recipe (augmentation on the
            device, folded normalization) and training.precision / channels_last `auto`, which
            this run resolves for this CPU as training does (visionflow.train.autotune: bf16 only where
            native, the faster memory format as measured) and prints; --precision and
            --channels-last override them. Its train_images_per_second: evaluation excluded
  ceiling   the same model, optimizer and loss: forward + backward + step on preloaded, normalized
            float batches in a tight loop (same precision and memory format)

and, in a subprocess, the peak RSS of fit() on 50,000 32x32 images (the 5,000 tiled 10x).
On a GPU each timed slice ends with a device synchronize, so it counts the work it queued.

The CPUs are shared with other work, so a long measurement mostly measures the neighbours.
Each round therefore times one short slice of each method (SLICE_BATCHES batches, interleaved),
and a method's figure is its best slice over the rounds: the speed it reaches when it has the
cores, measured the same way for all three.
Before the last line it prints the arithmetic limit: FLOPs of one training image (forward +
backward, counted by torch.utils.flop_counter), the best of a few 2048x2048 matrix products in
the same precision on this machine, and the images/s that would allow.
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

from visionflow.config import DataConfig, PipelineConfig, build_config  # noqa: E402
from visionflow.data.decoded import DecodedSplit, load_decoded  # noqa: E402
from visionflow.data.splits import decoded_cache_dir, resolve_dataset  # noqa: E402
from visionflow.data.transforms import BatchTransform, mean_std  # noqa: E402
from visionflow.errors import DeviceError  # noqa: E402
from visionflow.models import build_model  # noqa: E402
from visionflow.train import engine  # noqa: E402
from visionflow.train.autotune import fast_settings  # noqa: E402
from visionflow.train.device import DEVICE_NAMES, autocast, resolve_device  # noqa: E402
from visionflow.train.optim import build_optimizer  # noqa: E402
from visionflow.train.records import ModelSpec  # noqa: E402
from visionflow.train.rng import seed_everything  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cifar10-mini"
BATCH = DataConfig().batch_size  # the product default (64)
MODEL = "tudui"
DEVICE = torch.device("cpu")  # resolved in main() from --device, as training.device is
PRECISION = "auto"  # the product's default: resolved in main() as training resolves it
CHANNELS_LAST: bool | str = "auto"
SLICE_BATCHES = 20  # batches per timed slice: 1,280 images, about half a second per method
RSS_IMAGES = 50_000


def _config(epochs: int) -> PipelineConfig:
    return build_config(
        {
            "model": {"name": MODEL},
            "data": {"batch_size": BATCH},
            "training": {
                "epochs": epochs,
                "device": str(DEVICE),
                "precision": PRECISION,
                "channels_last": CHANNELS_LAST,
            },
        }
    )


def _decoded() -> tuple[DecodedSplit, DecodedSplit]:
    info = resolve_dataset(str(DATA), download=False)
    cache = decoded_cache_dir(REPO / "data")
    return load_decoded(info.train, 32, cache), load_decoded(info.eval_split, 32, cache)


def _spec(train: DecodedSplit) -> ModelSpec:
    return ModelSpec(MODEL, len(train.classes), 32, list(train.classes))


def _sync() -> None:
    """Wait for the work queued on DEVICE (a timed slice must include it); a CPU has none queued."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    elif DEVICE.type == "mps":
        torch.mps.synchronize()


def _subset(split: DecodedSplit | SimpleNamespace, n: int) -> SimpleNamespace:
    """n images drawn across all classes (the decoded split is sorted by class)."""
    index = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))[:n]
    return SimpleNamespace(images=split.images[index], labels=split.labels[index], classes=split.classes)


class Tutorial:
    """The tutorial's loop, JPEG decoding included; each slice runs the next SLICE_BATCHES batches."""

    def __init__(self) -> None:
        dataset = torchvision.datasets.ImageFolder(str(DATA / "train"), transform=T.ToTensor())
        self.loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
        self.model = build_model(MODEL, len(dataset.classes)).to(DEVICE)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loss_fn = nn.CrossEntropyLoss()

    def images_per_second(self) -> float:
        start, images = time.perf_counter(), 0
        for batch, (inputs, labels) in enumerate(self.loader, 1):
            inputs, labels = inputs.to(DEVICE), labels.to(DEVICE)
            loss = self.loss_fn(self.model(inputs), labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            images += len(labels)
            if batch == SLICE_BATCHES:
                break
        _sync()
        return images / (time.perf_counter() - start)


class Engine:
    """engine.fit over a SLICE_BATCHES-batch subset for two epochs: the second epoch's training
    images/s. (Epoch 1 pays the one-time costs of a fresh model and optimizer, which a real
    epoch of hundreds of batches amortizes; the other two methods are timed warm too.)"""

    def __init__(self, train: DecodedSplit, val: DecodedSplit) -> None:
        self.train, self.val = _subset(train, SLICE_BATCHES * BATCH), _subset(val, BATCH)

    def images_per_second(self) -> float:
        seed_everything(0)
        model = build_model(MODEL, len(self.train.classes))
        return engine.fit(model, self.train, self.val, _config(2), _spec(self.train)).history[-1].images_per_second


class Ceiling:
    """Forward + backward + step only, on normalized float batches prepared beforehand."""

    def __init__(self, train: DecodedSplit) -> None:
        config = _config(1).resolved()
        subset = _subset(train, SLICE_BATCHES * BATCH)
        mean, std = mean_std(train.images)
        prepare = BatchTransform(mean, std, DEVICE, channels_last=CHANNELS_LAST)
        self.batches = [
            (prepare(x.to(DEVICE)), y.to(DEVICE))
            for x, y in zip(subset.images.split(BATCH), subset.labels.split(BATCH))
        ]
        layout = torch.channels_last if CHANNELS_LAST else torch.contiguous_format
        self.model = build_model(MODEL, len(train.classes)).to(DEVICE, memory_format=layout)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)

    def images_per_second(self) -> float:
        start = time.perf_counter()
        for inputs, labels in self.batches:
            with autocast(DEVICE, PRECISION):
                loss = self.loss_fn(self.model(inputs), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        _sync()
        return SLICE_BATCHES * BATCH / (time.perf_counter() - start)


def peak_rss_child() -> None:
    """Subprocess body: fit one epoch on 50,000 images (tiled); print ru_maxrss in MB as JSON."""
    train, val = _decoded()
    repeats = -(-RSS_IMAGES // len(train.labels))
    big = SimpleNamespace(
        images=train.images.repeat(repeats, 1, 1, 1)[:RSS_IMAGES],  # (50000, 3, 32, 32) uint8
        labels=train.labels.repeat(repeats)[:RSS_IMAGES],
        classes=train.classes,
    )
    del train
    seed_everything(0)
    result = engine.fit(build_model(MODEL, len(big.classes)), big, val, _config(1), _spec(big))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(
        json.dumps(
            {"peak_rss_mb": peak_mb, "images": len(big.labels), "images_per_second": result.train_images_per_second}
        )
    )


def peak_rss_mb() -> dict:
    settings = ["--device", str(DEVICE), "--precision", PRECISION, "--channels-last", str(CHANNELS_LAST).lower()]
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", *settings], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def arithmetic_limit(num_classes: int) -> tuple[float, float]:
    """(FLOPs of one training image of MODEL, matmul FLOP/s at PRECISION on DEVICE)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(MODEL, num_classes)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(BATCH, 3, 32, 32)).sum().backward()
    dtype = torch.bfloat16 if PRECISION == "bf16" else torch.float32
    a, b = (torch.randn(2048, 2048, dtype=dtype, device=DEVICE) for _ in range(2))
    best = 0.0
    for _ in range(10):
        _sync()
        start = time.perf_counter()
        a @ b
        _sync()
        best = max(best, 2 * 2048**3 / (time.perf_counter() - start))
    return counter.get_total_flops() / BATCH, best


def main() -> None:
    global DEVICE, PRECISION, CHANNELS_LAST  # one setting for every method and the RSS subprocess
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help=f"{DEVICE_NAMES} (default: auto, as training.device)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved slices per method (best is kept)")
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="engine and ceiling precision (default: auto, as training); the tutorial loop is fp32 as written",
    )
    parser.add_argument(
        "--channels-last",
        choices=("auto", "true", "false"),
        default="auto",
        help="engine and ceiling memory format (default: auto, as training)",
    )
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        DEVICE = resolve_device(args.device)
    except DeviceError as err:
        sys.exit(f"error: {err}")  # one line on stderr, exit 1
    chosen = fast_settings(DEVICE, MODEL, 32)
    PRECISION = chosen.precision if args.precision == "auto" else args.precision
    CHANNELS_LAST = chosen.channels_last if args.channels_last == "auto" else args.channels_last == "true"
    print(
        f"engine and ceiling: precision {PRECISION} ({args.precision}), channels_last {CHANNELS_LAST} "
        f"({args.channels_last}) on {DEVICE}; auto there: {chosen.reason}",
        flush=True,
    )
    if args.rss_child:
        return peak_rss_child()
    train, val = _decoded()
    methods = {"tutorial": Tutorial(), "engine": Engine(train, val), "ceiling": Ceiling(train)}
    for method in methods.values():  # warm-up: oneDNN primitives, allocator, page cache
        method.images_per_second()
    best = dict.fromkeys(methods, 0.0)
    for round_ in range(1, args.rounds + 1):
        figures = {name: method.images_per_second() for name, method in methods.items()}
        best = {name: max(best[name], figures[name]) for name in methods}
        print(f"round {round_:2d}: " + "  ".join(f"{k} {v:6,.0f}" for k, v in figures.items()) + " img/s", flush=True)
    rss = peak_rss_mb()
    flops, peak = arithmetic_limit(len(train.classes))
    limit = peak / flops  # images/s if every FLOP ran at matmul speed
    print(
        f"arithmetic limit: {flops / 1e6:.1f} MFLOP per training image, {PRECISION} matmul {peak / 1e9:,.0f} GFLOP/s "
        f"-> {limit:,.0f} img/s; ceiling at {best['ceiling'] / limit:.0%}, engine at {best['engine'] / limit:.0%}"
    )
    print(
        f"best: tutorial {best['tutorial']:,.0f}  engine {best['engine']:,.0f}  ceiling {best['ceiling']:,.0f} img/s; "
        f"fit on {rss['images']:,} images: peak RSS {rss['peak_rss_mb']:.0f} MB, {rss['images_per_second']:,.0f} img/s"
    )
    print(
        f"R1={best['engine'] / best['tutorial']:.2f} R2={best['engine'] / best['ceiling']:.2f} "
        f"peak_rss_mb={rss['peak_rss_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
