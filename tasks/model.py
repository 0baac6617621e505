"""Model task: build the architecture once to describe it (parameters, layer shapes, graph)."""

from __future__ import annotations

from prefect import get_run_logger

from tasks.caching import TaskOutput, cached_task, written_files
from visionflow.manifest import ModelRecord
from visionflow.steps import describe_into


class ModelInfo(TaskOutput):
    record: ModelRecord


@cached_task("name", "num_classes", "image_size", task_run_name="describe {name}")
def describe_model(name: str, num_classes: int, image_size: int, run_dir: str) -> ModelInfo:
    """Build the model to write its layer summary (model.txt) and graph (TensorBoard)."""
    with written_files(run_dir) as files:
        summary = describe_into(run_dir, name, num_classes, image_size)
    get_run_logger().info("model %s: %s parameters", name, f"{summary.num_parameters:,}")
    record = ModelRecord(
        name=name, num_parameters=summary.num_parameters, trainable_parameters=summary.trainable_parameters
    )
    return ModelInfo(record=record, files=files)
