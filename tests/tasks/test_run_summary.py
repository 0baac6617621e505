"""The run-summary artifact of a real run (the fixture run written by visionflow 0.1), published
from a flow run on the session's temporary Prefect API and read back: every table is read cell
by cell, as a user reads it in the Prefect UI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.context import get_run_context

from tasks.artifacts import SUMMARY_KEY, publish_summary
from visionflow.manifest import Manifest, MetricsRecord
from visionflow.reports import PER_CLASS_COLUMNS, run_summary_markdown
from visionflow.runs import RunLayout
from visionflow.train.records import EpochMetrics, time_to_accuracy

FIXTURE_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "written_by_0.1" / "runs" / "done"


@flow
def summary_flow(run_dir: Path) -> UUID:
    publish_summary(run_summary_markdown(Manifest.load(run_dir), run_dir))
    return get_run_context().flow_run.id


def published_summary(flow_run_id: UUID) -> str:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[SUMMARY_KEY])
            )
        )
    return artifact.data


def tables(markdown: str) -> dict[str, list[list[str]]]:
    """Every markdown table by the title of its section: the header row, then the body rows
    (the |---| line checked and dropped); cells unescaped and stripped."""
    found: dict[str, list[list[str]]] = {}
    title = ""
    for block in re.split(r"\n(?=## )", markdown):
        title = block.splitlines()[0].removeprefix("## ")
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            assert set(lines[1]) <= {"|", "-"}, lines[1]
            rows = [lines[0], *lines[2:]]
            found[title] = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The fixture run in an output directory of its own, with a time to 30% accuracy (the run
    reached 34.2% in its one epoch) as time_to_accuracy records it; its evaluation.json."""
    run_dir = tmp_path_factory.mktemp("out") / "runs" / "done"
    shutil.copytree(FIXTURE_RUN, run_dir)
    manifest = Manifest.load(run_dir)
    metrics, timing = manifest.metrics, manifest.timing
    epoch = EpochMetrics(1, 4, 2.0, 0.3, metrics.eval_loss, metrics.eval_accuracy, 0.01, 3708.0, timing.train_seconds)
    reached = time_to_accuracy([epoch], milestones=(0.3, 0.5))
    metrics = MetricsRecord.model_validate(metrics.model_dump() | {"time_to_accuracy": reached})
    manifest.model_copy(update={"metrics": metrics}).save(run_dir)
    return run_dir, json.loads(RunLayout(run_dir).evaluation.read_text())


@pytest.fixture(scope="module")
def summary(run: tuple[Path, dict]) -> str:
    run_dir, _ = run
    markdown = published_summary(summary_flow(run_dir))
    assert markdown == run_summary_markdown(Manifest.load(run_dir), run_dir)
    return markdown


def test_per_class_metrics_are_their_own_table(summary: str, run: tuple[Path, dict]) -> None:
    _, evaluation = run
    header, *rows = tables(summary)["Per-class metrics"]
    assert header == list(PER_CLASS_COLUMNS) == ["class", "precision", "recall", "f1", "support"]
    assert [row[0] for row in rows] == evaluation["classes"]
    assert rows[0] == ["airplane", "0.5128", "0.4000", "0.4494", "50"]
    assert "per_class" not in summary and "{'class'" not in summary  # not a list of dicts in one cell


def test_seconds_read_as_seconds_and_fractions_as_percent(summary: str, run: tuple[Path, dict]) -> None:
    metrics = dict(tables(summary)["Metrics"][1:])
    assert metrics["time_to_accuracy.30%.seconds"] == "0.4 s"  # was "40.45%": seconds as a percent
    assert metrics["time_to_accuracy.30%.epoch"] == "1" and metrics["time_to_accuracy.50%"] == "-"
    assert metrics["eval_accuracy"] == "34.20%" and metrics["eval_top5"] == "80.40%"
    assert metrics["eval_loss"] == "1.8813"
    timing = dict(tables(summary)["Timing"][1:])
    assert timing["total_seconds"] == "12.7 s" and timing["train_images_per_second"] == "3708.4"
    seconds = [cell for table in tables(summary).values() for row in table for cell in row if cell.endswith(" s")]
    assert len(seconds) >= 5 and not any(cell.endswith("%") for cell in seconds)


def test_no_table_has_an_empty_header_row(summary: str) -> None:
    found = tables(summary)
    assert {"Metrics", "Per-class metrics", "Data", "Model", "Timing", "Outputs", "Reproduce"} <= set(found)
    assert "Where an epoch's time goes" in found
    for title, (header, *rows) in found.items():
        assert all(header), f"{title}: an empty header cell in {header}"
        assert rows and all(len(row) == len(header) for row in rows), title
    assert found["Model"][0] == ["field", "value"] and found["Outputs"][0] == ["output", "path"]
