"""Fixtures for the data-layer tests: images written in any mode, small folder datasets, and
subsets of the real (read-only) data copied to a temp dir."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

WriteImage = Callable[..., Path]


def write_image(
    path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 10), seed: int = 0, fmt: str | None = None
) -> Path:
    """Write a random-content image of the given mode; different seeds give different pixels."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode.startswith("I;16"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        shape = (height, width, bands) if bands > 1 else (height, width)
        rgb = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8).squeeze())
        image = rgb if rgb.mode == mode else rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


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
