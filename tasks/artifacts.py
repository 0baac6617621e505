"""Prefect artifacts for a run: the summary, tables, images and a live training-progress bar.

Call these from inside a task or flow run (that is what links an artifact to the run). Keys are
stable (``ARTIFACT_KEYS``), so the UI's Artifacts page keeps one history per key across
scheduled runs.

Images: Prefect's image artifact only takes a URL the browser can fetch, and run outputs live on
the worker's disk, which the UI cannot reach. So an image is published as a markdown artifact
embedding the picture as a ``data:image/...;base64`` URI. Prefect's UI (v2, the 3.9 default)
explicitly allows ``data:image/`` sources in markdown; the image is shrunk (JPEG, then smaller)
until it fits ``MAX_IMAGE_BYTES``, because every artifact is stored in the API database and
sent with each artifact listing.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

from PIL import Image
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate

from visionflow.tables import Table
from visionflow.train.records import Callback, EpochMetrics, FitResult, FitStart

SUMMARY_KEY = "run-summary"
VALIDATION_KEY = "validation-report"
PER_CLASS_KEY = "per-class-metrics"
CONFUSION_KEY = "confusion-matrix"
PREVIEW_KEY = "transform-preview"
MISCLASSIFIED_KEY = "misclassified"
PROGRESS_KEY = "training-progress"
HISTORY_KEY = "training-history"
DATA_CHANGES_KEY = "data-changes"  # against the champion's data, or the previous run's
RUN_DIRECTORY_KEY = "run-directory"  # a link (file:// on the worker)
TENSORBOARD_KEY = "tensorboard"  # a link, only with output.tensorboard_url, so not in ARTIFACT_KEYS
NEAR_DUPLICATES_KEY = "near-duplicates"  # only with data.near_duplicates, so not in ARTIFACT_KEYS
ARTIFACT_KEYS = (
    SUMMARY_KEY,
    VALIDATION_KEY,
    PER_CLASS_KEY,
    CONFUSION_KEY,
    PREVIEW_KEY,
    MISCLASSIFIED_KEY,
    PROGRESS_KEY,
    HISTORY_KEY,
    DATA_CHANGES_KEY,
    RUN_DIRECTORY_KEY,
)

# Encoded image bytes per artifact (base64 adds a third). Small enough that listing a few
# dozen artifacts stays fast; a 600 px confusion matrix or a preview grid fits as PNG.
MAX_IMAGE_BYTES = 300_000
_KEY_PATTERN = re.compile(r"^[a-z0-9-]+$")
# training-history columns: EpochMetrics field -> (column, decimals; None keeps the value as is).
HISTORY_COLUMNS = {
    "epoch": ("epoch", None),
    "train_loss": ("train loss", 4),
    "train_accuracy": ("train accuracy", 4),
    "eval_loss": ("eval loss", 4),
    "eval_accuracy": ("eval accuracy", 4),
    "lr": ("learning rate", None),
    "images_per_second": ("images/s", 1),
    "seconds": ("seconds", 2),
}


def _checked_key(key: str) -> str:
    if not _KEY_PATTERN.match(key):
        raise ValueError(f"Invalid artifact key '{key}': expected lowercase letters, digits and dashes only")
    return key


def publish_markdown(key: str, markdown: str, description: str | None = None) -> UUID:
    """Create a markdown artifact under ``key``."""
    return create_markdown_artifact(markdown=markdown, key=_checked_key(key), description=description)


def publish_link(key: str, link: str, text: str, description: str | None = None) -> UUID:
    """Create a link artifact under ``key``."""
    return create_link_artifact(link=link, link_text=text, key=_checked_key(key), description=description)


def publish_summary(markdown: str, description: str | None = "Run summary") -> UUID:
    """Publish the run summary markdown under ``run-summary``."""
    return publish_markdown(SUMMARY_KEY, markdown, description)


TABLE_DIGITS = 4  # significant digits of a float in a table artifact: 0.5128205128205128 reads 0.5128


def _json_ready(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value  # a numpy scalar -> its Python number
    if not isinstance(value, float):
        return value
    return None if math.isnan(value) else float(f"{value:.{TABLE_DIGITS}g}")  # still a number: the UI sorts it


def table_records(table: Table | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts (numpy scalars become Python numbers, floats keep TABLE_DIGITS
    significant digits, NaN becomes None); the CSV files keep every digit."""
    records = table.records() if isinstance(table, Table) else table
    return [{name: _json_ready(value) for name, value in record.items()} for record in records]


def publish_table(key: str, table: Table | Sequence[Mapping[str, Any]], description: str | None = None) -> UUID:
    """Create a table artifact under ``key`` from a `reports.Table` or a list of row dicts."""
    return create_table_artifact(table=table_records(table), key=_checked_key(key), description=description)


def image_data_uri(path: Path | str, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """The image file as a ``data:`` URI of at most ``max_bytes`` encoded bytes: the PNG as is
    when small enough, else a JPEG, halved in size until it fits."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix.lower() == ".png" and len(raw) <= max_bytes:
        return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")
    with Image.open(path) as source:
        image = source.convert("RGB")
    while True:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85, optimize=True)
        if buffer.tell() <= max_bytes or min(image.size) <= 16:
            return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.LANCZOS)


def publish_image(key: str, png_path: Path | str, description: str | None = None) -> UUID:
    """Publish an image file under ``key`` as markdown with the picture embedded (renders in the UI)."""
    png_path = Path(png_path)
    markdown = f"![{key}]({image_data_uri(png_path)})\n\nFull-size file: `{png_path}`\n"
    return publish_markdown(key, markdown, description)


def history_row(metrics: EpochMetrics) -> dict[str, float | int]:
    """One epoch as a ``training-history`` row (readable column names, rounded figures)."""
    return {
        column: getattr(metrics, name) if decimals is None else round(getattr(metrics, name), decimals)
        for name, (column, decimals) in HISTORY_COLUMNS.items()
    }


class PrefectProgressCallback(Callback):
    """Engine callback: a ``training-progress`` progress artifact, created at fit start and
    updated after every epoch with the latest metrics in its description, and a
    ``training-history`` table artifact with one row per finished epoch (a resumed run's
    earlier epochs included), updated in place after every epoch."""

    def __init__(self, total_epochs: int, key: str = PROGRESS_KEY, history_key: str = HISTORY_KEY) -> None:
        if total_epochs < 1:
            raise ValueError(f"Invalid total_epochs {total_epochs}: expected an integer >= 1")
        self.total_epochs = total_epochs
        self.key = _checked_key(key)
        self.history_key = _checked_key(history_key)
        self.artifact_id: UUID | None = None
        self.history_id: UUID | None = None
        self.rows: list[dict[str, float | int]] = []

    def on_fit_start(self, state: FitStart) -> None:
        # A resumed run starts at its checkpoint's epoch, not at 0.
        self.artifact_id = create_progress_artifact(
            progress=100.0 * state.epoch / self.total_epochs,
            key=self.key,
            description=f"epoch {state.epoch}/{self.total_epochs}",
        )
        self.rows = [history_row(metrics) for metrics in state.history]
        self.history_id = create_table_artifact(
            table=table_records(self.rows), key=self.history_key, description="Training history, one row per epoch"
        )

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        description = (
            f"epoch {metrics.epoch}/{self.total_epochs}: train loss {metrics.train_loss:.4f}, "
            f"eval loss {metrics.eval_loss:.4f}, eval accuracy {metrics.eval_accuracy:.2%}"
        )
        update_progress_artifact(
            artifact_id=self.artifact_id, progress=100.0 * metrics.epoch / self.total_epochs, description=description
        )
        # One artifact per run, updated in place: a new version per epoch would bury the key's
        # history across runs under partial tables.
        self.rows.append(history_row(metrics))
        with get_client(sync_client=True) as client:
            client.update_artifact(self.history_id, ArtifactUpdate(data=json.dumps(table_records(self.rows))))

    def on_fit_end(self, result: FitResult) -> None:
        # Early stopping ends the fit before the last epoch; the bar still has to reach 100 %.
        if result.stopped_early:
            update_progress_artifact(
                artifact_id=self.artifact_id,
                progress=100.0,
                description=f"stopped early after epoch {len(result.history)}",
            )
