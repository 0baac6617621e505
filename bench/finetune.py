"""Transfer shown, not claimed: fine-tuning weights pretrained here against training from scratch
(not a test). Run from the repo root:

    .venv/bin/python bench/finetune.py [--image-size 48] [--pretrain-epochs 5] [--epochs 10] [--shots 20]
                                       [--seeds 0 1 2] [--batch 16] [--fresh]

No ImageNet weights can be downloaded on these machines, so the pretrained weights are made here:

  pretrain   torchvision's ResNet-18 (`resnet18`: the standard 7x7 stride-2 stem and max-pool), random
             init (model.weights none), on 8 of cifar10-mini's classes (all but HELD_OUT: 4,000 train,
             800 val images, copied into a temporary folder) at --image-size px (data.image_size: the
             32 px JPEGs upsampled; the standard stem shrinks 32 px to 1x1 by its last stage), for
             --pretrain-epochs epochs with every other product default (the default recipe, seed 0).
             Cached: its run is kept under data/bench-finetune/ (git-ignored), keyed on these settings and
             the torch version, and a rerun reuses it (--fresh trains it again).
  task       the 2 HELD_OUT classes, --shots train images each (the first by file name), evaluated on
             all of their val images (100 each).
  finetuned  `steps.train_run` with model.weights run:<the pretrain run>: the product's defaults with
             pretrained weights (recipe finetune: input size, crop and normalization from the weights'
             spec, random-resized crops and flips, 1 head-only epoch, backbone lr x0.1)
  scratch    `steps.train_run` with model.weights none at the same image size: the product's defaults
             without weights (the default recipe)

Both for --epochs epochs with batch --batch (the default 64 would make one step an epoch of 40
images), once per seed (training.seed: initialization of what is not pretrained, batch order,
augmentation). Accuracy: the last epoch's, on the task's val images. The spread is the larger of
the two sides' seed-to-seed ranges (max - min).
The last line is `scratch_acc=<mean> finetuned_acc=<mean> same_epochs=N margin=<finetuned - scratch>
seed_spread=<spread>`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionflow.config import WEIGHTS_RUN, build_config  # noqa: E402
from visionflow.cores import usable_cores  # noqa: E402
from visionflow.data.splits import resolve_folder  # noqa: E402
from visionflow.fileio import atomic_write_json  # noqa: E402
from visionflow.runs import RunLayout, runs_root  # noqa: E402
from visionflow.steps import train_run  # noqa: E402
from visionflow.train.autotune import cpu_name  # noqa: E402
from visionflow.train.records import FitResult  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cifar10-mini"
CACHE = REPO / "data" / "bench-finetune"  # the pretrain runs kept between runs of the bench
MODEL = "resnet18"
HELD_OUT = ("ship", "truck")  # the task's classes; the other 8 are pretrained on
SUMMARY = "bench-summary.json"  # beside a cached pretrain run: its seconds and accuracy


def copy_classes(target: Path, classes: tuple[str, ...], shots: int | None = None) -> Path:
    """target/{train,val}/<class> for `classes`, copied from cifar10-mini; `shots`: only the first
    that many train files of each class (by name)."""
    for split in ("train", "val"):
        for name in classes:
            files = sorted((DATA / split / name).iterdir())
            if split == "train" and shots is not None:
                files = files[:shots]
            (target / split / name).mkdir(parents=True)
            for file in files:
                shutil.copyfile(file, target / split / name / file.name)
    return target


def train(run_dir: Path, dataset: Path, settings: dict) -> FitResult:
    """steps.train_run on `dataset` with `settings` (nested config overrides) over the defaults."""
    return train_run(run_dir, resolve_folder(dataset), build_config(settings), progress_stream=io.StringIO())


def pretrain(args: argparse.Namespace, work: Path) -> tuple[str, dict]:
    """The pretrain run's name under CACHE (trained unless cached) and its summary."""
    classes = tuple(sorted(p.name for p in (DATA / "train").iterdir() if p.name not in HELD_OUT))
    settings = {
        "model": {"name": MODEL},
        "data": {"image_size": args.image_size, "data_dir": str(work / "data")},
        "training": {"epochs": args.pretrain_epochs, "seed": 0},
    }
    key = json.dumps({"model": MODEL, "classes": classes, "training": settings["training"], "size": args.image_size})
    name = f"pretrain-{hashlib.sha256(f'{key}|torch {torch.__version__}'.encode()).hexdigest()[:12]}"
    run_dir = runs_root(CACHE) / name
    if not args.fresh and (run_dir / SUMMARY).is_file() and RunLayout(run_dir).best_checkpoint.is_file():
        return name, {**json.loads((run_dir / SUMMARY).read_text()), "cached": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = train(run_dir, copy_classes(work / "pretrain", classes), settings)
    summary = {
        "classes": list(classes),
        "seconds": time.perf_counter() - start,
        "eval_accuracy": result.history[-1].eval_accuracy,
        "images_per_second": result.train_images_per_second,
        "precision": result.precision,
        "channels_last": result.channels_last,
    }
    atomic_write_json(run_dir / SUMMARY, summary)
    return name, {**summary, "cached": False}


def spread(values: list[float]) -> float:
    return max(values) - min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=48, help="data.image_size of every run (default 48)")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="pretraining epochs (default 5)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each task run (default 10)")
    parser.add_argument("--shots", type=int, default=20, help="train images per task class (default 20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training.seed of the task runs")
    parser.add_argument("--batch", type=int, default=16, help="data.batch_size of the task runs (default 16)")
    parser.add_argument("--fresh", action="store_true", help="pretrain again even when cached")
    args = parser.parse_args()
    print(f"cpu: {cpu_name()}, {usable_cores()} usable cores; {MODEL} at {args.image_size} px", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        name, summary = pretrain(args, work)
        print(
            f"pretrain {name} on {len(summary['classes'])} classes, {args.pretrain_epochs} epochs: val accuracy "
            f"{summary['eval_accuracy']:.3f}, {summary['seconds']:.0f} s, {summary['images_per_second']:.0f} img/s "
            f"({summary['precision']}, channels_last {summary['channels_last']})"
            + (" (cached: not retrained)" if summary["cached"] else ""),
            flush=True,
        )
        task = copy_classes(work / "task", HELD_OUT, args.shots)
        common = {
            "data": {"data_dir": str(work / "data"), "batch_size": args.batch},
            "output": {"output_dir": str(CACHE)},
        }
        sides = {
            "scratch": {"model": {"name": MODEL}, "data": {"image_size": args.image_size}},
            "finetuned": {"model": {"name": MODEL, "weights": f"{WEIGHTS_RUN}{name}"}, "data": {}},
        }
        accuracy: dict[str, list[float]] = {side: [] for side in sides}
        for seed in args.seeds:
            for side, own in sides.items():
                settings = {
                    "model": own["model"],
                    "data": {**common["data"], **own["data"]},
                    "training": {"epochs": args.epochs, "seed": seed},
                    "output": common["output"],
                }
                start = time.perf_counter()
                result = train(work / f"{side}-{seed}", task, settings)
                accuracy[side].append(result.history[-1].eval_accuracy)
                print(
                    f"seed {seed} {side}: val accuracy {accuracy[side][-1]:.3f} "
                    f"(best {max(m.eval_accuracy for m in result.history):.3f}), {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    means = {side: statistics.mean(values) for side, values in accuracy.items()}
    seed_spread = max(spread(values) for values in accuracy.values())
    for side, values in accuracy.items():
        print(
            f"{side}: mean {means[side]:.3f}, per seed {', '.join(f'{v:.3f}' for v in values)}, "
            f"range {spread(values):.3f}" + (f", std {statistics.stdev(values):.3f}" if len(values) > 1 else "")
        )
    print(
        f"scratch_acc={means['scratch']:.3f} finetuned_acc={means['finetuned']:.3f} same_epochs={args.epochs} "
        f"margin={means['finetuned'] - means['scratch']:.3f} seed_spread={seed_spread:.3f}"
    )


if __name__ == "__main__":
    main()
