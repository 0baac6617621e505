"""Prefect artifacts published from a real flow run (temporary API from the harness in
conftest.py), then read back through the Prefect client."""

from __future__ import annotations

import base64
import json
from io import BytesIO
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
from PIL import Image
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.context import get_run_context

from tasks.artifacts import (
    HISTORY_KEY,
    MISCLASSIFIED_KEY,
    PER_CLASS_KEY,
    PREVIEW_KEY,
    PROGRESS_KEY,
    SUMMARY_KEY,
    VALIDATION_KEY,
    PrefectProgressCallback,
    image_data_uri,
    publish_image,
    publish_summary,
    publish_table,
    table_records,
)
from visionflow.tables import Table
from visionflow.train.records import EpochMetrics, FitResult, FitStart, ModelSpec


def metrics(epoch: int) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch,
        step=10 * epoch,
        train_loss=1.5 / epoch,
        train_accuracy=0.4,
        eval_loss=1.25,
        eval_accuracy=0.5,
        lr=0.01,
        images_per_second=900.0,
        seconds=2.0,
    )


@task
def train_with_progress(epochs: int, stop_after: int, resumed_after: int = 0) -> None:
    # The engine's call sequence for a run that stops after `stop_after` epochs (early when
    # fewer than `epochs`), resumed from a checkpoint of epoch `resumed_after` when nonzero.
    callback = PrefectProgressCallback(total_epochs=epochs)
    history = [metrics(epoch) for epoch in range(1, stop_after + 1)]
    callback.on_fit_start(
        FitStart(
            epoch=resumed_after,
            step=10 * resumed_after,
            epochs=epochs,
            steps_per_epoch=10,
            train_images=80,
            eval_images=20,
            device="cpu",
            config={},
            spec={},
            history=history[:resumed_after],
        )
    )
    for epoch_metrics in history[resumed_after:]:
        callback.on_epoch_end(epoch_metrics)
    callback.on_fit_end(
        FitResult(
            history=history,
            best_metric=0.5,
            best_epoch=1,
            last_checkpoint=None,
            best_checkpoint=None,
            train_seconds=4.0,
            train_images_per_second=900.0,
            weights_sha256="0" * 64,
            stopped_early=stop_after < epochs,
            device="cpu",
            spec=ModelSpec("tudui", 2, 32, ["cat", "dog"]),
            precision="fp32",
            channels_last=False,
            loader="memory",
        )
    )


@task
def publish_reports(preview: Path, large: Path, accuracy: float) -> None:
    publish_summary(f"# Run `demo`\n\neval accuracy {accuracy:.2%}")
    per_class = Table.of(  # numpy scalars and NaN, as metrics computed with numpy hold
        ("class", "precision", "support"),
        [
            {"class": "cat", "precision": np.float64(0.5), "support": np.int64(3)},
            {"class": "dog", "precision": np.nan, "support": np.int64(4)},
        ],
    )
    publish_table(PER_CLASS_KEY, per_class, "Per-class metrics")
    publish_table(VALIDATION_KEY, [{"issue": "unreadable", "path": "cat/x.png", "detail": "truncated image data"}])
    publish_image(PREVIEW_KEY, preview, "Transform preview")
    publish_image(MISCLASSIFIED_KEY, large)


@flow
def reporting_flow(preview: Path, large: Path, accuracy: float) -> UUID:
    publish_reports(preview, large, accuracy)
    train_with_progress(epochs=4, stop_after=3)
    return get_run_context().flow_run.id


@flow
def resumed_flow() -> UUID:
    train_with_progress(epochs=4, stop_after=4, resumed_after=2)
    return get_run_context().flow_run.id


def read_run_artifacts(flow_run_id: UUID) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in artifacts}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images")
    preview = folder / "preview.png"
    Image.new("RGB", (40, 20), (200, 30, 30)).save(preview)
    # Noise does not compress: ~750 kB as PNG, over the artifact limit, so it must be shrunk.
    noise = np.random.default_rng(0).integers(0, 256, (500, 500, 3), dtype=np.uint8)
    large = folder / "large.png"
    Image.fromarray(noise).save(large)
    return preview, large


@pytest.fixture(scope="module")
def run_artifacts(images: tuple[Path, Path]) -> tuple[dict[str, object], dict[str, object]]:
    """Two runs of the flow (as two scheduled runs would be): the second run's artifacts, and
    the first run's."""
    first = read_run_artifacts(reporting_flow(*images, accuracy=0.25))
    second = read_run_artifacts(reporting_flow(*images, accuracy=0.75))
    return second, first


def decoded_image(markdown: str, mime: str) -> Image.Image:
    prefix = f"data:{mime};base64,"
    start = markdown.index(prefix) + len(prefix)
    encoded = markdown[start : markdown.index(")", start)]
    return Image.open(BytesIO(base64.b64decode(encoded)))


def test_every_key_is_published_once_per_run(run_artifacts) -> None:
    latest, _ = run_artifacts
    assert {key: artifact.type for key, artifact in latest.items()} == {
        SUMMARY_KEY: "markdown",
        PER_CLASS_KEY: "table",
        VALIDATION_KEY: "table",
        PREVIEW_KEY: "markdown",
        MISCLASSIFIED_KEY: "markdown",
        PROGRESS_KEY: "progress",
        HISTORY_KEY: "table",
    }


def test_summary_and_tables(run_artifacts) -> None:
    latest, _ = run_artifacts
    assert latest[SUMMARY_KEY].data == "# Run `demo`\n\neval accuracy 75.00%"
    assert json.loads(latest[PER_CLASS_KEY].data) == [
        {"class": "cat", "precision": 0.5, "support": 3},
        {"class": "dog", "precision": None, "support": 4},
    ]
    assert latest[PER_CLASS_KEY].description == "Per-class metrics"
    assert json.loads(latest[VALIDATION_KEY].data)[0]["detail"] == "truncated image data"


def test_images_are_embedded_and_small(run_artifacts, images) -> None:
    latest, _ = run_artifacts
    preview, large = images
    markdown = latest[PREVIEW_KEY].data
    assert markdown.startswith(f"![{PREVIEW_KEY}](data:image/png;base64,")
    assert f"`{preview}`" in markdown
    with decoded_image(markdown, "image/png") as shown:
        assert shown.size == (40, 20) and shown.getpixel((0, 0)) == (200, 30, 30)
    big = latest[MISCLASSIFIED_KEY].data
    assert len(big) < 420_000  # MAX_IMAGE_BYTES of JPEG, plus base64's third
    with decoded_image(big, "image/jpeg") as shown:
        assert shown.format == "JPEG" and shown.size[0] <= 500


def test_progress_reaches_100_when_stopped_early(run_artifacts) -> None:
    latest, _ = run_artifacts
    progress = latest[PROGRESS_KEY]
    assert progress.data == 100.0
    assert progress.description == "stopped early after epoch 3"


def history_epochs(artifact) -> list[int]:
    return [row["epoch"] for row in json.loads(artifact.data)]


def test_training_history_has_a_row_per_finished_epoch(run_artifacts) -> None:
    latest, _ = run_artifacts
    rows = json.loads(latest[HISTORY_KEY].data)
    assert [row["epoch"] for row in rows] == [1, 2, 3]  # stopped early after epoch 3 of 4
    assert rows[1] == {
        "epoch": 2,
        "train loss": 0.75,
        "train accuracy": 0.4,
        "eval loss": 1.25,
        "eval accuracy": 0.5,
        "learning rate": 0.01,
        "images/s": 900.0,
        "seconds": 2.0,
    }


def test_training_history_is_updated_in_place(run_artifacts) -> None:
    latest, _ = run_artifacts
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[HISTORY_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[latest[HISTORY_KEY].flow_run_id]),
            )
        )
    assert [artifact.id for artifact in versions] == [latest[HISTORY_KEY].id]  # not a version per epoch


def test_resumed_training_history_holds_every_epoch() -> None:
    resumed = read_run_artifacts(resumed_flow())
    assert history_epochs(resumed[HISTORY_KEY]) == [1, 2, 3, 4]
    with get_client(sync_client=True) as client:
        collection = {c.key: c for c in client.read_latest_artifacts()}[HISTORY_KEY]
    # The Artifacts page shows the key's latest version: updated along with it.
    assert collection.latest_id == resumed[HISTORY_KEY].id
    assert history_epochs(collection) == [1, 2, 3, 4]


def test_stable_keys_keep_a_history(run_artifacts) -> None:
    latest, first = run_artifacts
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY])))
        collections = {c.key: c for c in client.read_latest_artifacts()}
    ids = {artifact.id for artifact in versions}
    assert {latest[SUMMARY_KEY].id, first[SUMMARY_KEY].id} <= ids
    assert collections[SUMMARY_KEY].latest_id == latest[SUMMARY_KEY].id
    assert first[SUMMARY_KEY].data.endswith("25.00%")


def test_image_data_uri_shrinks_to_the_limit(images) -> None:
    _, large = images
    uri = image_data_uri(large, max_bytes=20_000)
    assert uri.startswith("data:image/jpeg;base64,")
    assert len(base64.b64decode(uri.split(",", 1)[1])) <= 20_000


def test_invalid_key_names_the_key(images) -> None:
    preview, _ = images
    with pytest.raises(ValueError, match="'Preview_1'.*lowercase letters, digits and dashes"):
        publish_image("Preview_1", preview)


def test_table_artifact_floats_keep_four_significant_digits_and_stay_numbers():
    rows = [{"class": "cat", "precision": np.float64(0.5128205128205128), "lr": 1.2345678e-05, "support": np.int64(50)}]
    assert table_records(rows) == [{"class": "cat", "precision": 0.5128, "lr": 1.235e-05, "support": 50}]
    assert table_records([{"loss": float("nan"), "seconds": 3698.7123}]) == [{"loss": None, "seconds": 3699.0}]
