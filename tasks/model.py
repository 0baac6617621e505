"""Model tasks: locate the pretrained weights a run starts from, and build the architecture once to
describe it (backbone, weights, head, what is frozen, parameters, layer shapes, graph)."""

from __future__ import annotations

from prefect import get_run_logger, task

from tasks.caching import TaskOutput, cached_task, written_files
from visionflow.config import ModelConfig, PipelineConfig
from visionflow.manifest import ModelRecord
from visionflow.steps import describe_into
from visionflow.weights import locate, with_weights


class ModelInfo(TaskOutput):
    record: ModelRecord


@task(task_run_name="locate weights {config.model.weights}")
def locate_weights(config: PipelineConfig) -> PipelineConfig:
    """`config` with what its model.weights file says filled in (input size, crop, normalization
    left empty, the file's sha256): the file found in its cache, downloaded when missing and online.
    Not cached: the answer is the file as it is now."""
    weights = locate(config.model, config.output.output_dir)
    if weights is not None:
        get_run_logger().info("weights %s: %s (sha256 %s)", weights.source, weights.path, weights.sha256)
    return with_weights(config, weights)


@cached_task("model", "num_classes", "image_size", task_run_name="describe {model.name}")
def describe_model(model: ModelConfig, num_classes: int, image_size: int, run_dir: str) -> ModelInfo:
    """Build the model to write its layer summary (model.txt) and graph (TensorBoard)."""
    with written_files(run_dir) as files:
        record = describe_into(run_dir, model, num_classes, image_size)
    get_run_logger().info(
        "model %s: %s parameters, weights %s", model.name, f"{record.num_parameters:,}", model.weights
    )
    return ModelInfo(record=record, files=files)
