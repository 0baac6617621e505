"""Flow-test fixtures: tiny data, tiny configs, and read-back helpers through the Prefect client.

Tests opt in to the session's temporary Prefect API (`prefect_harness`, tests/conftest.py) with
`pytestmark = pytest.mark.usefixtures("prefect_harness")`: the real-server tests in this folder
run their own server and must not see the harness settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import TaskRun

from tests.flows.server_fixtures import copy_tiny_dataset
from visionflow.config import PipelineConfig, load_config

TINY_CLASSES = ("airplane", "automobile", "cat", "ship")
HEAVY_TASKS = (
    "download_dataset",
    "validate_data",
    "preview_transforms",
    "describe_model",
    "train_model",
    "evaluate_checkpoint",
    "export_checkpoint",
)
FINAL_STATES = {"Completed", "Cached", "Failed", "Crashed", "Cancelled"}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, sample_dataset: Path) -> Path:
    """4 classes x (8 train + 4 val) images of the bundled sample: one batch per epoch."""
    return copy_tiny_dataset(sample_dataset, tmp_path_factory.mktemp("tiny") / "data", TINY_CLASSES, 8, 4)


def tiny_config(dataset: Path, output: Path, **overrides: Any) -> PipelineConfig:
    """One CPU epoch on `dataset`, everything written under `output`; overrides by dotted field."""
    values = {
        "data.dataset": str(dataset),
        "data.data_dir": str(output / "data"),
        "data.batch_size": 16,
        "training.epochs": 1,
        "training.device": "cpu",
        "output.output_dir": str(output),
    }
    return load_config(None, {**values, **overrides})


def train(config: PipelineConfig) -> dict[str, Any]:
    """Run the training flow; its manifest as the JSON-ready dict written to manifest.json."""
    from flows.train import train_pipeline

    return train_pipeline(config).model_dump(mode="json")


def run_dir_of(manifest: dict[str, Any]) -> Path:
    return Path(manifest["config"]["output"]["output_dir"]) / "runs" / manifest["run_name"]


def task_name(run: TaskRun) -> str:
    """The name of the task a task run ran: its task key is "<task name>-<code hash>" (run names
    are the readable ones of tasks/names.py)."""
    return run.task_key.rsplit("-", 1)[0]


def task_states(flow_run_id: str, timeout: float = 30.0) -> dict[str, str]:
    """Task name -> state name of a flow run's task runs, read through the API (task run states
    arrive as events, so wait until every one is final)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states = {task_name(run): run.state.name for run in runs if run.state is not None}
            if states and set(states.values()) <= FINAL_STATES and len(states) == len(runs):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"task runs of {flow_run_id} not final after {timeout}s: {states}")
            time.sleep(0.5)


def task_run_names(flow_run_id: str) -> dict[str, str]:
    """Task name -> task run name of a flow run's task runs, once every one is final."""
    task_states(flow_run_id)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {task_name(run): run.name for run in runs}


def artifact_keys(flow_run_id: str) -> set[str]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key for artifact in artifacts if artifact.key}


def artifact_data(flow_run_id: str, key: str) -> Any:
    """The data of a flow run's artifact under `key` (a table's rows decoded)."""
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
            )
        )
    return json.loads(artifact.data) if artifact.type == "table" else artifact.data


def log_messages(flow_run_id: str, containing: str, timeout: float = 30.0, until: str | None = None) -> list[str]:
    """The flow run's log messages (its tasks' included) that contain `containing`, read once one
    containing `until` (default: `containing`) is there: logs are shipped to the API in the
    background, in the order they were written, so wait for the last line the caller relies on."""
    until = containing if until is None else until
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any(until in log.message for log in logs) or time.monotonic() > deadline:
                return [log.message for log in logs if containing in log.message]
            time.sleep(0.5)
