"""The scoring flow: classify new images with a model (a checkpoint, an export or the champion of a
slot) into a table. The `score-inbox` deployment runs it every night and after each promotion."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow

from tasks.caching import durable_results
from tasks.scoring import list_images, publish_scores, resolve_scoring_model, score_task
from visionflow.config import OutputConfig
from visionflow.scoring import ScoreConfig


def scoring_name() -> str:
    """The flow run's name: `score-<YYYYmmdd-HHMMSS>`."""
    return f"score-{datetime.now():%Y%m%d-%H%M%S}"


@flow(name="score-images", flow_run_name=scoring_name, validate_parameters=True)
def score_images_flow(config: ScoreConfig) -> dict[str, Any]:
    """Score config.inputs with config.checkpoint into config.table; an unchanged rerun is a cache hit."""
    with durable_results(OutputConfig(output_dir=config.output_dir)):
        model = resolve_scoring_model(config)
        inputs = list_images(config)
        output = score_task(inputs, model, config)
        publish_scores(output)
    return output.summary
