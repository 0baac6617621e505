"""Fixtures for the data-layer tests: images written in any mode, small folder datasets, and
subsets of the real (read-only) data copied to a temp dir."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers import write_image

WriteImage = Callable[..., Path]


@pytest.fixture
def image_writer() -> WriteImage:
    return write_image


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    """ROOT/train/{cat,dog} (4 images each) + ROOT/val/{cat,dog} (2 each), all distinct pixels."""
    root = tmp_path / "pets"
    seed = 0
    for split, n in (("train", 4), ("val", 2)):
        for name in ("cat", "dog"):
            for i in range(n):
                seed += 1
                write_image(root / split / name / f"{i}.png", seed=seed)
    return root


def copy_subset(src: Path, dst: Path, per_class: int) -> Path:
    """Copy the first per_class files of every src/<split>/<class>/ into dst (same layout)."""
    for class_dir in sorted(p for p in src.glob("*/*") if p.is_dir()):
        target = dst / class_dir.relative_to(src)
        target.mkdir(parents=True)
        for file in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy2(file, target / file.name)
    return dst


@pytest.fixture
def cifar_subset(cifar_mini: Path, tmp_path: Path) -> Path:
    """A writable copy of cifar10-mini with 6 files per split and class (120 files)."""
    return copy_subset(cifar_mini, tmp_path / "cifar_subset", per_class=6)
