"""Memory vs stream loader at real image sizes (not a test). Run from the repo root:

    .venv/bin/python bench/stream.py [--images 20000] [--small 5000] [--batch 16] [--steps 4] [--warmup 1]

Dataset: ../shared/data/hymenoptera_data/train (244 JPEGs, ~500x375) replicated by symbolic links
to N images in a temporary folder (the source is only read), its own val split for evaluation.
Model resnet18_cifar (the CIFAR-stem ResNet-18, called resnet18 when this bench was written) at
224 px, everything else the product's defaults (the default recipe with its
on-device augmentation, training.precision / channels_last `auto`, data.num_workers None = the
usable cores), except data.mean/std, given (ImageNet's) so that no variant pays a statistics pass
over the split, and the batch: 16 by default (--batch), as resnet18_cifar keeps its 32-px
stem (3x3 stride 1, no max-pool) at 224 px too: ~16x torchvision's FLOPs and activations per
image, a 64-image step takes minutes on 2 cores and ~8 GB.

Each variant runs in its own process, which builds the run as `engine.fit` does and then trains a
bounded number of steps, not whole epochs (a 20,000-image epoch of resnet18_cifar takes hours on 2
cores): `--warmup` steps (the stream loader's workers start, the memory loader is on the device),
then `--steps` timed ones, training images/s over those. Before that, the memory variant decodes the
split into RAM and writes its decoded cache (in the temporary data_dir; that time is printed, not
in images/s). The peak RSS of a variant is its process tree's largest process (os.wait4 of the
child: Linux ru_maxrss), the training process in practice; the stream loader's worker processes are
each far smaller (one batch of images).

Variants: memory at N images, stream at N and at --small images (the flat-RSS check).
The CPUs are shared with other work: images/s figures are noisy.
The last line is `stream_vs_memory=<stream img/s / memory img/s at N> stream_peak_rss_mb=<MB at N>`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCE = REPO.parent / "shared" / "data" / "hymenoptera_data"
IMAGE_SIZE = 224
MODEL = "resnet18_cifar"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def replicate(source: Path, target: Path, images: int) -> Path:
    """target/train with `images` symbolic links cycling over source/train's files (class by class
    in turn), target/val linking source/val's files once."""
    per_class = [sorted(p for p in folder.iterdir() if p.is_file()) for folder in sorted((source / "train").iterdir())]
    train = [file for row in itertools.zip_longest(*per_class) for file in row if file is not None]
    for copy, file in zip(range(images), itertools.cycle(train)):
        link = target / "train" / file.parent.name / f"{copy:06d}-{file.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file)
    for file in (p for p in (source / "val").glob("*/*") if p.is_file()):
        link = target / "val" / file.parent.name / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(file)
    return target


def variant(dataset: Path, data_dir: Path, loader: str, batch: int, steps: int, warmup: int) -> dict:
    """In the child: the run `fit` builds on `loader`, `warmup` steps, then `steps` timed ones."""
    from visionflow.config import build_config
    from visionflow.data.decoded import choose_loader, open_split
    from visionflow.data.splits import resolve_folder
    from visionflow.train import engine
    from visionflow.train.device import resolve_device
    from visionflow.train.distributed import Ranks
    from visionflow.train.records import ModelSpec
    from visionflow.train.rng import seed_everything

    config = build_config(
        {
            "model": {"name": MODEL},
            "data": {
                "dataset": str(dataset),
                "data_dir": str(data_dir),
                "image_size": IMAGE_SIZE,
                "loader": loader,
                "batch_size": batch,
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            },
            "training": {"epochs": 1, "device": "cpu"},
        }
    ).resolved()
    info = resolve_folder(dataset)
    start = time.perf_counter()
    chosen = choose_loader(config.data, info.train, info.eval_split)
    train, evaluation = (open_split(split, config.data, chosen) for split in (info.train, info.eval_split))
    open_seconds = time.perf_counter() - start
    device = resolve_device("cpu")
    spec = ModelSpec(MODEL, len(info.classes), IMAGE_SIZE, list(info.classes), IMAGENET_MEAN, IMAGENET_STD)
    config = engine.with_fast_settings(config, spec, device)
    seed_everything(0)
    run = engine._build_run(spec.build(), train, evaluation, config, device, Ranks.current())
    batches = iter(run.train_batches)
    timed = []
    for count in (warmup, steps):
        stats = engine.train_one_epoch(
            run.train_forward,
            run.criterion,
            run.optimizer,
            run.scheduler,
            itertools.islice(batches, count),
            device,
            precision=config.training.precision,
        )
        timed.append(stats)
    return {
        "loader": chosen,
        "images": len(train),
        "open_seconds": open_seconds,
        "images_per_second": timed[1].images / timed[1].seconds,
        "precision": config.training.precision,
        "channels_last": config.training.channels_last,
        "num_workers": getattr(train, "num_workers", 0),
    }


def measure(images: int, loader: str, batch: int, steps: int, warmup: int, work: Path) -> dict:
    """`variant` in a child process on a fresh `images`-image replica; adds its peak RSS (MB)."""
    dataset = replicate(SOURCE, work / f"{loader}-{images}", images)
    result_file = work / f"{loader}-{images}.json"
    argv = [sys.executable, __file__, "--child", str(dataset), str(work / "data"), loader]
    argv += [str(batch), str(steps), str(warmup)]
    with open(result_file, "w") as out:
        child = subprocess.Popen(argv, stdout=out)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"the {loader} variant on {images} images failed (exit {child.returncode})")
    result = json.loads(result_file.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="replicated training images (default 20,000)")
    parser.add_argument("--small", type=int, default=5_000, help="the smaller stream run (default 5,000)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default 16, see above)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per variant (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        dataset, data_dir, loader, batch, steps, warmup = args.child
        print(json.dumps(variant(Path(dataset), Path(data_dir), loader, int(batch), int(steps), int(warmup))))
        return
    from visionflow.cores import usable_cores

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"cpu: {cpu}, {usable_cores()} usable cores; {MODEL} at {IMAGE_SIZE} px", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        runs = {}
        for images, loader in ((args.small, "stream"), (args.images, "stream"), (args.images, "memory")):
            result = measure(images, loader, args.batch, args.steps, args.warmup, Path(tmp))
            runs[images, loader] = result
            print(
                f"{loader:6s} {images:>6,} images: {result['images_per_second']:.2f} img/s "
                f"over {args.steps} steps of {args.batch}, "
                f"peak RSS {result['peak_rss_mb']:,.0f} MB, split opened in {result['open_seconds']:.1f} s "
                f"(precision {result['precision']}, channels_last {result['channels_last']}, "
                f"workers {result['num_workers']})",
                flush=True,
            )
    ratio = runs[args.images, "stream"]["images_per_second"] / runs[args.images, "memory"]["images_per_second"]
    print(f"stream_vs_memory={ratio:.2f} stream_peak_rss_mb={runs[args.images, 'stream']['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
