"""Transform preview: what the model really sees. A fixed, seeded handful of training images, each
shown as the original file, the evaluation input and two draws of the training input (with the
configured augmentation), un-normalized back to pixels for display.

The training column goes through the training fast path itself (resize as the decoded cache
does, then ``transforms.BatchTransform`` with a seeded generator), not a look-alike PIL pipeline,
so the preview cannot drift from what training does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from visionflow.config import decode_size
from visionflow.data.images import load_rgb
from visionflow.data.splits import Split
from visionflow.data.transforms import CROP_PADDING, BatchTransform, eval_pipeline, resize
from visionflow.errors import DatasetError
from visionflow.reports import BLACK, WHITE, default_font, fit_to_tile

PREVIEW_COUNT = 8
TRAIN_DRAWS = 2  # two augmented draws per image show that the augmentation is random
MAX_TILE = 128  # display pixels per picture; small inputs are enlarged up to this, pixel for pixel
MIN_TILE = 96
LABEL_WIDTH = 96
HEADER_HEIGHT = 20


def preview_indices(split: Split, count: int = PREVIEW_COUNT, seed: int = 0) -> list[int]:
    """``count`` distinct indices into ``split``, the same for the same seed and split."""
    if len(split) == 0:
        raise DatasetError(f"Split '{split.name}' at '{split.root}' has no images: expected at least one to preview")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(len(split), generator=generator)[:count].tolist()


def _to_pixels(normalized: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo Normalize: float (B, 3, S, S) model input -> uint8 (B, 3, S, S) pixels."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (normalized * std_t + mean_t).clamp(0, 1).mul(255).round().to(torch.uint8)


def _tile(picture: Image.Image, tile: int, pixelated: bool) -> Image.Image:
    """``picture`` scaled to fit a ``tile`` square, keeping its aspect ratio; nearest-neighbour
    for model inputs so each input pixel stays a visible block."""
    return fit_to_tile(picture, tile, Image.Resampling.NEAREST if pixelated else Image.Resampling.LANCZOS)


def build_preview(
    split: Split,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    seed: int = 0,
    count: int = PREVIEW_COUNT,
    crop_padding: int = CROP_PADDING,
    crop_pct: float = 1.0,
    train_crop: str = "pad",
) -> Image.Image:
    """The preview grid for ``count`` seeded training images: one row per image with columns
    original | eval input | train input x2. ``mean``/``std`` are the normalization the run uses
    (``FitStart.spec`` / ``transforms.mean_std`` of the train split), ``augment`` the resolved
    ``config.data.augment`` (with ``config.data.crop_padding`` or ``train_crop``), ``crop_pct``
    the evaluation's center crop."""
    indices = preview_indices(split, count, seed)
    originals = [load_rgb(split.files[i]) for i in indices]
    evaluate = eval_pipeline(image_size, mean, std, crop_pct)
    evaluated = torch.stack([evaluate(image) for image in originals])  # (K, 3, S, S)
    # uint8 (K, 3, D, D): the decoded-cache form the training loop starts from.
    size = decode_size(image_size, crop_pct)
    decoded = torch.stack([torch.from_numpy(np.array(resize(size)(image))).permute(2, 0, 1) for image in originals])
    generator = torch.Generator().manual_seed(seed)
    train_transform = BatchTransform(
        mean,
        std,
        "cpu",
        augment=generator if augment else None,
        crop_padding=crop_padding,
        size=image_size,
        train_crop=train_crop,
    )
    columns = [evaluated] + [train_transform(decoded) for _ in range(TRAIN_DRAWS)]  # each (K, 3, S, S)
    pixels = [_to_pixels(column, mean, std) for column in columns]

    train_title = "train input" if augment else "train (no augment)"
    titles = ["original", "eval input"] + [train_title] * TRAIN_DRAWS
    tile = int(np.clip(image_size, MIN_TILE, MAX_TILE))
    cell = tile + 8
    grid = Image.new("RGB", (LABEL_WIDTH + cell * len(titles), HEADER_HEIGHT + cell * len(indices)), WHITE)
    draw = ImageDraw.Draw(grid)
    font = default_font()
    for col, title in enumerate(titles):
        draw.text((LABEL_WIDTH + col * cell + cell / 2, HEADER_HEIGHT / 2), title, font=font, anchor="mm", fill=BLACK)
    for row, (index, original) in enumerate(zip(indices, originals)):
        top = HEADER_HEIGHT + row * cell
        draw.text(
            (LABEL_WIDTH - 6, top + cell / 2), split.classes[split.labels[index]], font=font, anchor="rm", fill=BLACK
        )
        shown = [_tile(original, tile, pixelated=False)]
        shown += [
            _tile(Image.fromarray(column[row].permute(1, 2, 0).numpy()), tile, pixelated=True) for column in pixels
        ]
        for col, picture in enumerate(shown):
            left = LABEL_WIDTH + col * cell
            grid.paste(picture, (left + (cell - picture.width) // 2, top + (cell - picture.height) // 2))
    return grid
