"""Label issues on cifar10-mini with labels corrupted on purpose (not a test). Run from the repo root:

    .venv/bin/python bench/label_issues.py [--fraction 0.02] [--folds 5] [--epochs 10]

A copy of ../shared/data/cifar10-mini (hard links where the file system allows, else copies; the
source is only read) in a temporary folder, where `--fraction` of the train images (seeded) are
moved into another class's folder, chosen at random: their given label is wrong. Label issues
are searched (`visionflow.label_issues.find_issues`: `--folds` folds, each a tudui training of
`--epochs` epochs with the default recipe on the CPU), and the flagged set is compared with the
moved images: precision (flagged that were moved) and recall (moved that were flagged). The
same search on the uncorrupted copy says how many a clean dataset flags (the original CIFAR-10
has a few wrong labels of its own, so some are expected).
The last line is `precision=<p> recall=<r> flagged=<n> moved=<m> clean_flagged=<k> of <N>`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionflow.config import load_config  # noqa: E402
from visionflow.cores import usable_cores  # noqa: E402
from visionflow.data.splits import resolve_dataset  # noqa: E402
from visionflow.label_issues import find_issues  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "cifar10-mini"


def copy_tree(target: Path) -> None:
    for path in sorted(SOURCE.rglob("*")):
        destination = target / path.relative_to(SOURCE)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        try:
            os.link(path, destination)
        except OSError:
            shutil.copy(path, destination)


def corrupt(root: Path, fraction: float, seed: int) -> set[str]:
    """Move `fraction` of the train images to another class's folder; their new train-relative paths."""
    rng = random.Random(seed)
    files = sorted((root / "train").glob("*/*"))
    classes = sorted(p.name for p in (root / "train").iterdir())
    moved = set()
    for path in rng.sample(files, round(fraction * len(files))):
        wrong = rng.choice([c for c in classes if c != path.parent.name])
        target = root / "train" / wrong / f"moved-{path.parent.name}-{path.name}"
        path.rename(target)
        moved.add(target.relative_to(root / "train").as_posix())
    return moved


def flagged(root: Path, output: Path, folds: int, epochs: int) -> tuple[set[str], int, float]:
    overrides = {
        "data.dataset": str(root),
        "data.data_dir": str(output / "data"),
        "training.epochs": epochs,
        "training.device": "cpu",
        "output.output_dir": str(output),
        "label_issues.folds": folds,
    }
    config = load_config(None, overrides).resolved()
    dataset = resolve_dataset(str(root))
    start = time.perf_counter()
    report = find_issues(dataset, config)
    return {issue.file for issue in report.issues}, report.num_train, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.02)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"usable cores: {usable_cores()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="label-issues-") as tmp:
        clean, noisy = Path(tmp) / "clean", Path(tmp) / "noisy"
        copy_tree(clean)
        copy_tree(noisy)
        moved = corrupt(noisy, args.fraction, args.seed)
        found, total, seconds = flagged(noisy, Path(tmp) / "out-noisy", args.folds, args.epochs)
        hits = len(found & moved)
        precision, recall = hits / max(1, len(found)), hits / max(1, len(moved))
        print(f"corrupted: {len(moved)} of {total} moved, {len(found)} flagged, {hits} of them moved ({seconds:.0f} s)")
        clean_found, _, clean_seconds = flagged(clean, Path(tmp) / "out-clean", args.folds, args.epochs)
        print(f"clean: {len(clean_found)} of {total} flagged ({clean_seconds:.0f} s)")
        print(
            f"precision={precision:.3f} recall={recall:.3f} flagged={len(found)} moved={len(moved)} "
            f"clean_flagged={len(clean_found)} of {total}"
        )


if __name__ == "__main__":
    main()
