"""Transform preview grid: seeded choice, real transforms, atomic PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.data.preview import HEADER_HEIGHT, LABEL_WIDTH, TRAIN_DRAWS, build_preview, preview_indices
from visionflow.data.splits import Split, resolve_dataset
from visionflow.errors import DatasetError
from visionflow.reports import write_png

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture
def train_split(folder_dataset: Path) -> Split:
    return resolve_dataset(str(folder_dataset), download=False).train  # 8 images, 12x10 px


def tile(grid: Image.Image, row: int, col: int, size: int) -> np.ndarray:
    """The pixels of one grid cell (cells are size + 8 px, pictures centred)."""
    cell = size + 8
    left, top = LABEL_WIDTH + col * cell + 4, HEADER_HEIGHT + row * cell + 4
    return np.asarray(grid.crop((left, top, left + size, top + size)), dtype=np.int16)


def test_indices_are_seeded_distinct_and_capped(train_split: Split) -> None:
    first = preview_indices(train_split, 4, seed=1)
    assert first == preview_indices(train_split, 4, seed=1)
    assert len(set(first)) == 4
    assert preview_indices(train_split, 4, seed=2) != first
    assert sorted(preview_indices(train_split, 50)) == list(range(len(train_split)))


def test_write_preview_is_reproducible(tmp_path: Path, train_split: Split) -> None:
    image = build_preview(train_split, 16, MEAN, STD, augment=True, count=3)
    path = write_png(image, tmp_path / "run" / "preview.png")
    assert path == tmp_path / "run" / "preview.png"
    tile_size = 96  # 16 px inputs are enlarged to the minimum tile
    assert image.size == (LABEL_WIDTH + (2 + TRAIN_DRAWS) * (tile_size + 8), HEADER_HEIGHT + 3 * (tile_size + 8))
    with Image.open(path) as stored:
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(image))
    again = build_preview(train_split, 16, MEAN, STD, augment=True, count=3)
    assert np.array_equal(np.asarray(again), np.asarray(image))
    assert [p.name for p in path.parent.iterdir()] == ["preview.png"]  # no temp file left behind


def test_un_normalized_inputs_match_without_augmentation(train_split: Split) -> None:
    grid = build_preview(train_split, 16, MEAN, STD, augment=False, count=2)
    for row in range(2):
        eval_tile = tile(grid, row, 1, 96)
        # The train columns (fused uint8 path) equal the eval column (PIL path) within rounding.
        for col in range(2, 2 + TRAIN_DRAWS):
            assert np.abs(tile(grid, row, col, 96) - eval_tile).max() <= 1
        assert eval_tile.std() > 10  # real pictures, not blank tiles


def test_augmentation_changes_the_train_columns(train_split: Split) -> None:
    plain = build_preview(train_split, 16, MEAN, STD, augment=False, count=2)
    augmented = build_preview(train_split, 16, MEAN, STD, augment=True, count=2)
    assert np.array_equal(tile(plain, 0, 1, 96), tile(augmented, 0, 1, 96))  # eval column unchanged
    changed = [
        not np.array_equal(tile(plain, row, col, 96), tile(augmented, row, col, 96))
        for row in range(2)
        for col in range(2, 2 + TRAIN_DRAWS)
    ]
    assert any(changed)


def test_empty_split_is_a_dataset_error(train_split: Split) -> None:
    empty = train_split.without(train_split.files)
    with pytest.raises(DatasetError, match="no images"):
        preview_indices(empty)
