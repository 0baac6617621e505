"""Human-readable run outputs: the markdown run summary, CSV tables (per-class metrics, confusion
matrix, validation counts) and two PNG figures (confusion matrix, most confidently wrong
examples). Figures are drawn with PIL alone, so reports need no plotting library.

Every file is written atomically: a reader (TensorBoard, the Prefect UI, a user's viewer) sees
the previous version or the new one, never half a file.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from visionflow.checkpoints import atomic_write_bytes, atomic_write_text
from visionflow.images import load_rgb

FONT_SIZE = 12
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
# Darkest cell colour of the confusion matrix (a full row on one cell); white is 0.
CELL_DARK = np.array([8, 48, 107], dtype=np.float64)


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font: no font file needed on the machine.
    return ImageFont.load_default(size=FONT_SIZE)


# ---------------------------------------------------------------------------------------------
# Files


def write_png(image: Image.Image, path: Path | str) -> Path:
    """Save ``image`` as a PNG atomically; returns the path."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return atomic_write_bytes(path, buffer.getvalue())


def write_csv(frame: pd.DataFrame, path: Path | str) -> Path:
    """Write ``frame`` (without its index) as UTF-8 CSV atomically; returns the path."""
    return atomic_write_text(path, frame.to_csv(index=False))


# ---------------------------------------------------------------------------------------------
# Tables


def _square_matrix(matrix: np.ndarray | torch.Tensor | Sequence[Sequence[int]], classes: Sequence[str]) -> np.ndarray:
    counts = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"Invalid confusion matrix shape {counts.shape}: expected ({len(classes)}, {len(classes)}) "
                         f"for classes {list(classes)}")
    return counts


def confusion_frame(matrix: np.ndarray | torch.Tensor | Sequence[Sequence[int]], classes: Sequence[str]) -> pd.DataFrame:
    """The (C, C) confusion matrix as a table: column ``true`` then one count column per
    predicted class."""
    counts = _square_matrix(matrix, classes)
    frame = pd.DataFrame(counts.astype(np.int64), columns=list(classes))
    frame.insert(0, "true", list(classes))
    return frame


# ---------------------------------------------------------------------------------------------
# Figures


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` shortened with an ellipsis until it is at most ``width`` pixels wide."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def render_confusion_matrix(matrix: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
                            classes: Sequence[str]) -> Image.Image:
    """Draw the (C, C) confusion matrix (rows = true class, columns = predicted) as an RGB image.
    Cells are shaded by the row fraction (the recall of the true class), so rare classes are as
    readable as common ones; each cell shows its count when the cell is big enough."""
    counts = _square_matrix(matrix, classes)
    num_classes = len(classes)
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # Cells shrink with more classes so the figure stays around 600 px wide.
    cell = int(np.clip(600 // max(num_classes, 1), 14, 48))
    label_width = min(160, max(_text_width(measure, name, font) for name in classes) + 8)
    axis_band = FONT_SIZE + 8  # room for the "true" / "predicted" axis captions
    left, top = axis_band + label_width, axis_band + label_width
    width, height = left + num_classes * cell + 4, top + num_classes * cell + 4
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)

    row_totals = counts.sum(axis=1, keepdims=True)  # (C, 1)
    fractions = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)  # (C, C)
    for row in range(num_classes):
        for col in range(num_classes):
            shade = tuple(int(v) for v in np.asarray(WHITE) + (CELL_DARK - np.asarray(WHITE)) * fractions[row, col])
            x0, y0 = left + col * cell, top + row * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=shade, outline=(220, 220, 220))
            text = str(int(counts[row, col]))
            if _text_width(draw, text, font) <= cell - 2 and cell >= FONT_SIZE + 4:
                draw.text((x0 + cell / 2, y0 + cell / 2), text, font=font, anchor="mm",
                          fill=WHITE if fractions[row, col] > 0.5 else BLACK)

    for index, name in enumerate(classes):
        name = _fit_text(draw, name, font, label_width - 8)
        # Row labels, right-aligned against the grid.
        draw.text((left - 4, top + index * cell + cell / 2), name, font=font, anchor="rm", fill=BLACK)
        # Column labels: drawn horizontally on a strip, then rotated to read bottom-up.
        strip = Image.new("RGB", (label_width, cell), WHITE)
        ImageDraw.Draw(strip).text((4, cell / 2), name, font=font, anchor="lm", fill=BLACK)
        image.paste(strip.rotate(90, expand=True), (left + index * cell, top - label_width))

    draw.text((left + num_classes * cell / 2, 4), "predicted", font=font, anchor="mt", fill=BLACK)
    caption = Image.new("RGB", (num_classes * cell, axis_band), WHITE)
    ImageDraw.Draw(caption).text((num_classes * cell / 2, 4), "true", font=font, anchor="mt", fill=BLACK)
    image.paste(caption.rotate(90, expand=True), (0, top))
    return image


def render_misclassified(examples: Sequence[Mapping[str, Any]], root: Path | str | None = None,
                         tile: int = 96, columns: int = 4) -> Image.Image:
    """A grid of the most confidently wrong examples (``EvalReport.confidently_wrong``: dicts
    with ``file``, ``true``, ``predicted``, ``probability``), each captioned with its true and
    predicted class. Relative ``file`` paths are resolved against ``root``."""
    font = _font()
    line = FONT_SIZE + 4
    caption_height = 2 * line + 4
    if not examples:
        image = Image.new("RGB", (tile * columns, caption_height), WHITE)
        ImageDraw.Draw(image).text((4, 4), "no misclassified examples", font=font, fill=BLACK)
        return image
    columns = min(columns, len(examples))
    rows = -(-len(examples) // columns)  # ceil
    cell_width, cell_height = tile + 8, tile + caption_height + 8
    image = Image.new("RGB", (columns * cell_width, rows * cell_height), WHITE)
    draw = ImageDraw.Draw(image)
    for index, example in enumerate(examples):
        path = Path(example["file"])
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        picture = load_rgb(path)
        # Scale to the tile, keeping the aspect ratio (CIFAR's 32 px images are upscaled 3x).
        scale = tile / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.BICUBIC)
        x0, y0 = (index % columns) * cell_width + 4, (index // columns) * cell_height + 4
        image.paste(picture, (x0 + (tile - picture.width) // 2, y0 + (tile - picture.height) // 2))
        true_text = _fit_text(draw, f"true: {example['true']}", font, tile)
        predicted_text = _fit_text(draw, f"pred: {example['predicted']} {float(example['probability']):.0%}", font, tile)
        draw.text((x0, y0 + tile + 4), true_text, font=font, fill=(0, 110, 0))
        draw.text((x0, y0 + tile + 4 + line), predicted_text, font=font, fill=(180, 0, 0))
    return image
