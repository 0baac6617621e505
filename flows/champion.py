"""The champion evaluation flow: score the model in a champion slot on a dataset's evaluation
split (read-only: it never trains or promotes). The `evaluate-champion` deployment runs it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from tasks.caching import durable_results
from tasks.champion import score_champion
from tasks.data import download_dataset, fingerprint_data
from visionflow.config import PipelineConfig


def evaluation_name() -> str:
    """The flow run's name: `evaluate-<slot>-<YYYYmmdd-HHMMSS>`."""
    config = PipelineConfig.model_validate(flow_run.get_parameters()["config"])
    return f"evaluate-{config.output.champion}-{datetime.now():%Y%m%d-%H%M%S}"


@flow(name="evaluate-champion", flow_run_name=evaluation_name, validate_parameters=True)
def champion_evaluation(config: PipelineConfig) -> dict[str, Any]:
    """Score the champion in config.output.champion on config.data.dataset's evaluation split."""
    with durable_results(config.output):
        location = download_dataset(config.data)
        dataset = fingerprint_data(config.data, location)
        return score_champion(dataset, config)
