"""Evaluation and export tasks, keyed on the checkpoint's sha256 (not on how it was trained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.caching import FileRef, TaskOutput, created_files, outputs_in, verified_cache
from tasks.data import DatasetRef, ValidatedData, by_exclusions, by_fingerprint
from visionflow.cache import load_decoded
from visionflow.checkpoints import export_model, load_model
from visionflow.fileio import atomic_write_json
from visionflow.evaluation import evaluate_model
from visionflow.reports import render_misclassified, write_evaluation_csvs, write_png
from visionflow.runs import RunLayout
from visionflow.tensorboard import log_confusion_matrix

CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"


class EvalOutput(TaskOutput):
    accuracy: float
    loss: float
    top5: float | None
    num_images: int
    per_class: list[dict[str, Any]]


class ExportOutput(TaskOutput):
    weights_sha256: str


def by_sha256(ref: FileRef) -> str:
    """Cache identity of a file: its content."""
    return ref.sha256


@task(cache_policy=verified_cache("device", dataset=by_fingerprint, validated=by_exclusions, checkpoint=by_sha256,
                                  modules=("visionflow.evaluation", "visionflow.checkpoints", "visionflow.reports",
                                           "visionflow.engine", "visionflow.transforms", "visionflow.models",
                                           "visionflow.cache", "visionflow.tensorboard", "visionflow.images")))
def evaluate_checkpoint(dataset: DatasetRef, validated: ValidatedData, checkpoint: FileRef, device: str,
                        data_dir: str, run_dir: str) -> EvalOutput:
    """Evaluate the checkpoint on the eval split: evaluation.json, CSVs, confusion and misclassified images."""
    layout = RunLayout(Path(run_dir))
    model, spec = load_model(checkpoint.path)
    split = validated.apply(dataset.load()).eval_split
    report = evaluate_model(model, spec, load_decoded(split, spec.input_size, Path(data_dir) / "cache"), device=device)
    values = report.to_dict()
    atomic_write_json(layout.evaluation, values)
    tables = write_evaluation_csvs(values, layout.root)
    with created_files(run_dir, layout.tensorboard) as events:
        confusion = log_confusion_matrix(layout.tensorboard, report.confusion_matrix, report.classes)
    write_png(confusion, layout.root / CONFUSION_PNG)
    write_png(render_misclassified(values["confidently_wrong"], root=split.root), layout.root / MISCLASSIFIED_PNG)
    get_run_logger().info("eval accuracy %.4f, loss %.4f on %d images", report.accuracy, report.loss, report.num_images)
    relpaths = [layout.evaluation.name, CONFUSION_PNG, MISCLASSIFIED_PNG, *(p.name for p in tables.values())]
    return EvalOutput(accuracy=report.accuracy, loss=report.loss, top5=report.top5, num_images=report.num_images,
                      per_class=values["per_class"], files={**outputs_in(run_dir, relpaths), **events})


@task(cache_policy=verified_cache(checkpoint=by_sha256, modules=("visionflow.checkpoints",)))
def export_checkpoint(checkpoint: FileRef, run_dir: str) -> ExportOutput:
    """Export the checkpoint's weights (safetensors) and spec (json) for serving."""
    layout = RunLayout(Path(run_dir))
    model, spec = load_model(checkpoint.path)
    written = export_model(model, spec, layout.export_dir)
    relpaths = [Path(written[k]).resolve().relative_to(layout.root.resolve()).as_posix() for k in ("weights", "spec")]
    return ExportOutput(weights_sha256=written["weights_sha256"], files=outputs_in(run_dir, relpaths))
