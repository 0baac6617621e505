"""Scoring tasks: resolve the model once, fingerprint the inputs, score them into a table (cached
on both, holding the device's slots like a training), and publish what the table says."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from tasks.artifacts import publish_image, publish_table
from tasks.caching import FileRef, TaskOutput, cached_task
from tasks.training import device_slots
from visionflow.config import TrainingConfig
from visionflow.scoring import (
    ScoreConfig,
    ScoreSummary,
    inputs_fingerprint,
    resolve_inputs,
    resolve_model,
    score_images,
    write_lowest_png,
)
from visionflow.train.device_limits import device_claim

CLASS_COUNTS_KEY = "scoring-class-counts"
LOWEST_KEY = "scoring-lowest-confidence"


class ModelRef(BaseModel):
    """The model a scoring run uses, resolved once (a champion's version folder, not its slot)."""

    model_config = ConfigDict(frozen=True)
    path: str
    version: str  # sha256 of its weights


class InputsRef(BaseModel):
    model_config = ConfigDict(frozen=True)
    inputs: str
    images: int
    fingerprint: str  # scoring.inputs_fingerprint: every path and file content


class ScoreOutput(TaskOutput):
    summary: dict[str, Any]  # scoring.ScoreSummary as a dict


@task(cache_policy=NO_CACHE, task_run_name="resolve model {config.checkpoint}")
def resolve_scoring_model(config: ScoreConfig) -> ModelRef:
    """The model `config.checkpoint` names now, with its version."""
    model = resolve_model(config.checkpoint, config.output_dir)
    get_run_logger().info("model %s: %s (version %s)", config.checkpoint, model.path, model.version[:12])
    return ModelRef(path=str(model.path), version=model.version)


@task(cache_policy=NO_CACHE, task_run_name="list {config.inputs}")
def list_images(config: ScoreConfig) -> InputsRef:
    """The images to score, fingerprinted by path and content (every run: the key of the scoring)."""
    paths = resolve_inputs(config.inputs)
    return InputsRef(inputs=config.inputs, images=len(paths), fingerprint=inputs_fingerprint(paths))


def by_scoring_fields(config: ScoreConfig) -> dict[str, Any]:
    """What the table depends on besides the inputs and the model: top-k, batching, the table's path,
    the device (not the worker count, nor how the inputs and the model were named)."""
    return config.model_dump(exclude={"inputs", "checkpoint", "output_dir", "num_workers"})


@cached_task(
    inputs=lambda ref: ref.fingerprint,
    model=lambda ref: ref.version,
    config=by_scoring_fields,
    task_run_name="score {inputs.images} images",
)
def score_task(inputs: InputsRef, model: ModelRef, config: ScoreConfig) -> ScoreOutput:
    """Score the inputs with the resolved model into config.table, holding the device's slots."""
    logger = get_run_logger()
    with device_slots(device_claim(TrainingConfig(device=config.device)), logger):
        summary = score_images(resolve_model(model.path, config.output_dir), resolve_inputs(inputs.inputs), config)
    logger.info(
        "%d images, %d scored now, %d unreadable -> %s",
        summary.images,
        summary.scored,
        summary.unreadable,
        summary.table,
    )
    return ScoreOutput(summary=asdict(summary), files={Path(summary.table).name: FileRef.of(summary.table)})


@task(cache_policy=NO_CACHE, task_run_name="publish scores")
def publish_scores(output: ScoreOutput) -> None:
    """A table artifact of the images per predicted class and the least confident images as a picture."""
    summary = ScoreSummary(**output.summary)
    rows = [{"class": name, "images": count} for name, count in summary.class_counts.items()]
    publish_table(
        CLASS_COUNTS_KEY,
        rows + [{"class": "(unreadable)", "images": summary.unreadable}],
        f"{summary.images} images scored by model {summary.model_version[:12]}",
    )
    publish_image(LOWEST_KEY, write_lowest_png(summary), f"The {len(summary.lowest)} least confident images")
