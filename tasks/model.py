"""Model task: build the architecture once to describe it (parameters, layer shapes, graph)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from tasks.caching import TaskOutput, created_files, outputs_in, verified_cache
from visionflow.fileio import atomic_write_text
from visionflow.models import build_model, summarize
from visionflow.runs import RunLayout
from visionflow.tensorboard import log_model_graph

SUMMARY_FILE = "model.txt"


class ModelInfo(TaskOutput):
    name: str
    num_parameters: int
    trainable_parameters: int


@task(cache_policy=verified_cache("name", "num_classes", "image_size", modules=("visionflow.models", "visionflow.tensorboard")))
def describe_model(name: str, num_classes: int, image_size: int, run_dir: str) -> ModelInfo:
    """Build the model to write its layer summary (model.txt) and graph (TensorBoard)."""
    layout = RunLayout(Path(run_dir))
    model = build_model(name, num_classes)
    summary = summarize(model, image_size)
    atomic_write_text(layout.root / SUMMARY_FILE, summary.to_text() + "\n")
    with created_files(run_dir, layout.tensorboard) as events:
        log_model_graph(layout.tensorboard, model, image_size)
    get_run_logger().info("model %s: %s parameters", name, f"{summary.num_parameters:,}")
    return ModelInfo(name=name, num_parameters=summary.num_parameters,
                     trainable_parameters=summary.trainable_parameters,
                     files={**outputs_in(run_dir, [SUMMARY_FILE]), **events})
