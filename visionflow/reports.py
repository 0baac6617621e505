"""Human-readable run outputs: the markdown run summary, CSV tables (per-class metrics, confusion
matrix, validation counts) and two PNG figures (confusion matrix, most confidently wrong
examples). Figures are drawn with PIL alone, so reports need no plotting library.

Every file is written atomically: a reader (TensorBoard, the Prefect UI, a user's viewer) sees
the previous version or the new one, never half a file.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visionflow.data.images import load_rgb
from visionflow.data.near_duplicates import NearDuplicateReport
from visionflow.fileio import atomic_write_bytes, atomic_write_text
from visionflow.manifest import Manifest
from visionflow.runs import VALIDATION_ISSUES_CSV, RunLayout, runs_root
from visionflow.tables import (
    CODE,
    COUNT,
    MAX_LISTED,
    NUMBER,
    PERCENT,
    TEXT,
    Kind,
    Table,
    key_value_table,
    markdown_table,
)

FONT_SIZE = 12
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
# Darkest cell colour of the confusion matrix (a full row on one cell); white is 0.
CELL_DARK = np.array([8, 48, 107], dtype=np.float64)


def default_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font at FONT_SIZE: no font file needed on the machine."""
    return ImageFont.load_default(size=FONT_SIZE)


def fit_to_tile(picture: Image.Image, tile: int, resample: Image.Resampling) -> Image.Image:
    """``picture`` scaled to fit a ``tile`` x ``tile`` square, keeping its aspect ratio."""
    scale = tile / max(picture.size)
    return picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), resample)


# ---------------------------------------------------------------------------------------------
# Files


def write_png(image: Image.Image, path: Path | str) -> Path:
    """Save ``image`` as a PNG atomically; returns the path."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return atomic_write_bytes(path, buffer.getvalue())


def write_csv(table: Table, path: Path | str) -> Path:
    """Write ``table`` as UTF-8 CSV (a header row, then one line per row) atomically; returns the path."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Tables

Matrix = Any  # a (C, C) count matrix: numpy array, torch.Tensor (this module does not import torch) or nested lists
PER_CLASS_COLUMNS = {"class": TEXT, "precision": NUMBER, "recall": NUMBER, "f1": NUMBER, "support": COUNT}
ISSUE_COLUMNS = ("issue", "path", "detail")


def _square_matrix(matrix: Matrix, classes: Sequence[str]) -> np.ndarray:
    counts = np.asarray(matrix.cpu() if hasattr(matrix, "cpu") else matrix)  # a torch.Tensor, maybe on a GPU
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(
            f"Invalid confusion matrix shape {counts.shape}: expected ({len(classes)}, {len(classes)}) "
            f"for classes {list(classes)}"
        )
    return counts


def confusion_table(matrix: Matrix, classes: Sequence[str]) -> Table:
    """The (C, C) confusion matrix as a table: column ``true`` then one count column per
    predicted class."""
    counts = _square_matrix(matrix, classes)
    rows = tuple((name, *map(int, row)) for name, row in zip(classes, counts))
    return Table(("true", *classes), rows, (TEXT, *[COUNT] * len(classes)))


def per_class_table(evaluation: Mapping[str, Any]) -> Table:
    """Per-class precision, recall, F1 and support from ``EvalReport.to_dict()``."""
    return Table.of(PER_CLASS_COLUMNS, evaluation["per_class"])


def validation_counts_table(validation: Mapping[str, Any]) -> Table:
    """Images per class (rows) and split (columns, plus ``total``) from ``ValidationReport.to_dict()``."""
    splits = validation["splits"]
    rows = []
    for name in validation["classes"]:
        counts = [int(split["classes"].get(name, 0)) for split in splits.values()]
        rows.append((name, *counts, sum(counts)))
    return Table(("class", *splits, "total"), tuple(rows))


def validation_issues_table(validation: Mapping[str, Any]) -> Table:
    """One row per finding (``issue``, ``path``, ``detail``): unreadable files (left out),
    duplicate images within a split, and train/eval leakage (exact, and near-duplicates when
    they were searched)."""
    rows = [{"issue": "unreadable", "path": item["path"], "detail": item["reason"]} for item in validation["invalid"]]
    duplicates = validation["duplicates"]
    rows += [
        {"issue": "duplicate", "path": group[0], "detail": "same image as " + ", ".join(group[1:])}
        for group in duplicates["within_split"]
    ]
    rows += [
        {"issue": "train/eval leakage", "path": train, "detail": f"same image as {evaluated}"}
        for train, evaluated in duplicates["across_splits"]
    ]
    near = validation.get("near_duplicates", {"within_split": [], "across_splits": []})  # when searched
    rows += [
        {"issue": "near-duplicate", "path": group[0], "detail": "near-duplicate of " + ", ".join(group[1:])}
        for group in near["within_split"]
    ]
    rows += [
        {
            "issue": "near-duplicate leakage",
            "path": pair["train"],
            "detail": f"near-duplicate of {pair['eval']} (score {pair['score']:.3f})",
        }
        for pair in near["across_splits"]
    ]
    return Table.of(ISSUE_COLUMNS, rows)


def write_evaluation_csvs(evaluation: Mapping[str, Any], out_dir: Path | str) -> dict[str, Path]:
    """The per-class metrics and confusion matrix CSVs (runs.PER_CLASS_CSV, runs.CONFUSION_CSV) from
    ``EvalReport.to_dict()``, by file stem."""
    layout = RunLayout(Path(out_dir))
    per_class = write_csv(per_class_table(evaluation), layout.per_class_csv)
    confusion = write_csv(confusion_table(evaluation["confusion_matrix"], evaluation["classes"]), layout.confusion_csv)
    return {path.stem: path for path in (per_class, confusion)}


def write_validation_csvs(validation: Mapping[str, Any], out_dir: Path | str) -> dict[str, Path]:
    """The validation counts and issues CSVs (runs.VALIDATION_COUNTS_CSV, runs.VALIDATION_ISSUES_CSV)
    from ``ValidationReport.to_dict()``, by file stem."""
    layout = RunLayout(Path(out_dir))
    counts = write_csv(validation_counts_table(validation), layout.validation_counts_csv)
    issues = write_csv(validation_issues_table(validation), layout.validation_issues_csv)
    return {path.stem: path for path in (counts, issues)}


# ---------------------------------------------------------------------------------------------
# Markdown


def tensorboard_run_url(base_url: str, run_name: str) -> str:
    """The run's curves in a TensorBoard serving `<output_dir>/runs` at `base_url`: the time
    series view, its run filter set to this run's folder."""
    return f"{base_url.rstrip('/')}/#timeseries&runFilter={quote('^' + re.escape(run_name) + '/')}"


def tensorboard_command(log_dir: Path | str) -> str:
    """The shell command that opens TensorBoard on ``log_dir``."""
    return f"tensorboard --logdir {Path(log_dir)}"


def _headline(manifest: Manifest) -> list[str]:
    """The title, one sentence on what trained and how well, the error and the near-duplicate leakage."""
    config, metrics, data = manifest.config, manifest.metrics, manifest.data
    headline = (
        f"Model **{config.model.name}** on **{config.data.dataset}**, {config.training.epochs} epochs, "
        f"seed {manifest.seed}, device {manifest.device or '-'}"
    )
    if metrics is not None:
        headline += f": eval accuracy **{PERCENT.format(metrics.eval_accuracy)}**"
    parts = [f"# Run `{manifest.run_name}`: {manifest.status}", "", headline + "."]
    if manifest.error:
        parts += ["", f"**Error:** {manifest.error}"]
    if data is not None and data.eval_leakage_rate is not None:
        leak = (
            f"Near-duplicate leakage: **{data.eval_leakage_rate:.2%}** of the {data.eval_split} split "
            f"({len(data.leaked_eval)} images) has a near-duplicate in train"
        )
        if metrics is not None and metrics.eval_accuracy_with_leaked is not None:
            leak += (
                f"; left out of evaluation (accuracy {metrics.eval_accuracy:.2%} without them, "
                f"{metrics.eval_accuracy_with_leaked:.2%} with them)"
            )
        parts += ["", leak + "."]
    return parts


def _epoch_phases_table(seconds_per_epoch: Mapping[str, float]) -> Table:
    """Mean seconds per epoch by phase and each phase's share of the epoch."""
    epoch = sum(seconds_per_epoch.values())
    rows = tuple((phase, seconds, seconds / epoch) for phase, seconds in seconds_per_epoch.items())
    return Table(("phase", "per epoch", "share"), rows, (TEXT, Kind("seconds", 3), Kind("percent", 0)))


def _record_tables(manifest: Manifest) -> dict[str, Table]:
    """The manifest's records as tables by section title; per-class metrics and epoch phases as their own."""
    metrics, timing = manifest.metrics, manifest.timing
    tables: dict[str, Table] = {}
    if metrics is not None:
        tables["Metrics"] = key_value_table(metrics.model_dump(mode="json", exclude={"per_class"}))
        if metrics.per_class:
            tables["Per-class metrics"] = Table.of(PER_CLASS_COLUMNS, metrics.per_class)
    for title, record in (("Data", manifest.data), ("Model", manifest.model), ("Timing", timing)):
        if record is not None:
            tables[title] = key_value_table(record.model_dump(mode="json", exclude={"seconds_per_epoch"}))
    if timing is not None and timing.seconds_per_epoch:
        tables["Where an epoch's time goes"] = _epoch_phases_table(timing.seconds_per_epoch)
    return tables


def run_summary_markdown(manifest: Manifest, run_dir: Path | str) -> str:
    """The run summary as markdown: headline, metrics (per class too), data, model (parameter
    count), timing, where the outputs are (checkpoints, export, TensorBoard logs, with the command
    that opens TensorBoard) and what reproduces the run."""
    layout = RunLayout(Path(run_dir))
    parts = _headline(manifest)
    for title, table in _record_tables(manifest).items():
        parts += ["", f"## {title}", "", markdown_table(table)]
    outputs = {
        "run directory": layout.root,
        "last checkpoint": layout.last_checkpoint,
        "best checkpoint": layout.best_checkpoint,
        "export": layout.export_dir,
        "TensorBoard logs": layout.tensorboard,
        "manifest": layout.manifest,
    }
    written = tuple((name, str(path)) for name, path in outputs.items() if path.exists())
    parts += ["", "## Outputs", ""]
    parts.append(
        markdown_table(Table(("output", "path"), written, (TEXT, CODE))) if written else "Nothing written yet."
    )
    parts += ["", "Open this run in TensorBoard:", "", "```bash", tensorboard_command(layout.tensorboard), "```"]
    parts += ["", "Compare it with every other run:", "", "```bash"]
    parts += [tensorboard_command(runs_root(layout.root.parent.parent)), "```"]
    reproduce = {
        "seed": manifest.seed,
        "git commit": manifest.git_commit,
        "weights sha256": manifest.weights_sha256,
        "prefect flow run": manifest.prefect_flow_run_id,
        **manifest.versions,
    }
    parts += ["", "## Reproduce", "", markdown_table(key_value_table(reproduce, ("item", "value")))]
    parts += ["", "```bash", f"visionflow reproduce {layout.root}", "```", ""]
    return "\n".join(parts)


def validation_markdown(validation: Mapping[str, Any]) -> str:
    """The dataset validation report as markdown: fingerprint, images per class and split, and
    the first findings (unreadable files, duplicates, leakage)."""
    issues = validation_issues_table(validation)
    parts = [
        f"# Dataset `{validation['spec']}`",
        "",
        f"Fingerprint `{validation['fingerprint']}`",
        "",
        "## Images per class",
        "",
        markdown_table(validation_counts_table(validation)),
        "",
        "## Findings",
        "",
    ]
    if not issues.rows:
        parts.append("No unreadable files, duplicates or train/eval leakage.")
    else:
        counts = Counter(issues.column("issue")).most_common()
        parts.append(", ".join(f"{name}: {count}" for name, count in counts))
        parts += ["", markdown_table(Table(issues.columns, issues.rows[:MAX_LISTED]))]
        if len(issues.rows) > MAX_LISTED:
            parts.append(f"\n... and {len(issues.rows) - MAX_LISTED} more (see {VALIDATION_ISSUES_CSV})")
    return "\n".join(parts) + "\n"


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


def render_confusion_matrix(matrix: Matrix, classes: Sequence[str]) -> Image.Image:
    """Draw the (C, C) confusion matrix (rows = true class, columns = predicted) as an RGB image.
    Cells are shaded by the row fraction (the recall of the true class), so rare classes are as
    readable as common ones; each cell shows its count when the cell is big enough."""
    counts = _square_matrix(matrix, classes)
    num_classes = len(classes)
    font = default_font()
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
                draw.text(
                    (x0 + cell / 2, y0 + cell / 2),
                    text,
                    font=font,
                    anchor="mm",
                    fill=WHITE if fractions[row, col] > 0.5 else BLACK,
                )

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


def render_misclassified(
    examples: Sequence[Mapping[str, Any]], root: Path | str | None = None, tile: int = 96, columns: int = 4
) -> Image.Image:
    """A grid of the most confidently wrong examples (``EvalReport.confidently_wrong``: dicts
    with ``file``, ``true``, ``predicted``, ``probability``), each captioned with its true and
    predicted class. Relative ``file`` paths are resolved against ``root``."""
    font = default_font()
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
        picture = fit_to_tile(picture, tile, Image.Resampling.BICUBIC)  # CIFAR's 32 px: upscaled 3x
        x0, y0 = (index % columns) * cell_width + 4, (index // columns) * cell_height + 4
        image.paste(picture, (x0 + (tile - picture.width) // 2, y0 + (tile - picture.height) // 2))
        true_text = _fit_text(draw, f"true: {example['true']}", font, tile)
        predicted_text = _fit_text(
            draw, f"pred: {example['predicted']} {float(example['probability']):.0%}", font, tile
        )
        draw.text((x0, y0 + tile + 4), true_text, font=font, fill=(0, 110, 0))
        draw.text((x0, y0 + tile + 4 + line), predicted_text, font=font, fill=(180, 0, 0))
    return image


def render_near_duplicates(
    report: NearDuplicateReport, root: Path | str, limit: int = 8, tile: int = 64
) -> Image.Image:
    """The worst near-duplicate pairs side by side (train | eval across splits first, highest score
    first, then pairs within a split), each row captioned with its score and both paths
    (dataset-relative, resolved against ``root``)."""
    rows = [(p.train, p.eval, f"leak, score {p.score:.3f}") for p in report.across[:limit]]
    rows += [(group[0], group[1], "same split") for group in report.within[: max(0, limit - len(rows))]]
    font = default_font()
    text_width = 300
    width = 2 * tile + 16 + text_width
    if not rows:
        image = Image.new("RGB", (width, FONT_SIZE + 12), WHITE)
        ImageDraw.Draw(image).text((4, 4), "no near-duplicates", font=font, fill=BLACK)
        return image
    image = Image.new("RGB", (width, len(rows) * (tile + 8)), WHITE)
    draw = ImageDraw.Draw(image)
    for index, (first, second, caption) in enumerate(rows):
        y0 = index * (tile + 8) + 4
        for column, path in enumerate((first, second)):
            picture = fit_to_tile(load_rgb(Path(root) / path), tile, Image.Resampling.BICUBIC)
            image.paste(picture, (4 + column * (tile + 4), y0))
        x0 = 2 * tile + 16
        for line, text in enumerate((caption, first, second)):
            draw.text(
                (x0, y0 + line * (FONT_SIZE + 4)), _fit_text(draw, text, font, text_width - 4), font=font, fill=BLACK
            )
    return image
