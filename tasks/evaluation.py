"""Evaluation and export tasks, keyed on the checkpoint's sha256 (not on how it was trained)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from tasks.caching import FileRef, TaskOutput, cached_task, written_files
from tasks.data import DatasetRef, ValidatedData, by_exclusions, by_fingerprint
from tasks.names import run_name
from tasks.training import TrainOutput
from visionflow.config import DataConfig
from visionflow.manifest import MetricsRecord
from visionflow.steps import accuracy_on, export_into, write_evaluation
from visionflow.train.records import time_to_accuracy


class EvalOutput(TaskOutput):
    accuracy: float
    loss: float
    top5: float | None
    num_images: int
    per_class: list[dict[str, Any]]

    def metrics(self, training: TrainOutput, with_leaked: LeakedEvalOutput) -> MetricsRecord:
        """The manifest's metrics: this evaluation of the training's best checkpoint (and its
        accuracy with the leaked eval images that on_leak="drop-eval" left out)."""
        return MetricsRecord(
            eval_accuracy=self.accuracy,
            eval_loss=self.loss,
            eval_top5=self.top5,
            best_epoch=training.fit.best_epoch,
            epochs_trained=len(training.fit.history),
            per_class=self.per_class,
            eval_accuracy_with_leaked=with_leaked.accuracy,
            time_to_accuracy=time_to_accuracy(training.fit.history),
        )


class LeakedEvalOutput(TaskOutput):
    accuracy: float | None  # None: no leaked eval image was left out


class ExportOutput(TaskOutput):
    weights_sha256: str


def by_sha256(ref: FileRef) -> str:
    """Cache identity of a file: its content."""
    return ref.sha256


@cached_task(
    "device",
    dataset=by_fingerprint,
    validated=by_exclusions,
    checkpoint=by_sha256,
    task_run_name=run_name("evaluate {checkpoint_name}"),
)
def evaluate_checkpoint(
    dataset: DatasetRef, validated: ValidatedData, checkpoint: FileRef, device: str, data: DataConfig, run_dir: str
) -> EvalOutput:
    """Evaluate the checkpoint on the eval split: evaluation.json, CSVs, confusion and misclassified
    images; read as training read it (`data`: its data config, the loader resolved)."""
    with written_files(run_dir) as files:
        report = write_evaluation(run_dir, checkpoint.path, validated.apply(dataset).eval_split, device, data)
    get_run_logger().info("eval accuracy %.4f, loss %.4f on %d images", report.accuracy, report.loss, report.num_images)
    return EvalOutput(
        accuracy=report.accuracy,
        loss=report.loss,
        top5=report.top5,
        num_images=report.num_images,
        per_class=report.per_class.records(),
        files=files,
    )


@cached_task(
    "device",
    dataset=by_fingerprint,
    validated=by_exclusions,
    checkpoint=by_sha256,
    task_run_name=run_name("evaluate {checkpoint_name} with leaked"),
)
def evaluate_with_leaked(
    dataset: DatasetRef, validated: ValidatedData, checkpoint: FileRef, device: str, data: DataConfig
) -> LeakedEvalOutput:
    """Accuracy on the eval split with the leaked images that on_leak="drop-eval" left out (None when none were)."""
    if not validated.dropped_leaked:
        return LeakedEvalOutput(accuracy=None)
    full = validated.apply(dataset, keep_leaked=True).eval_split
    accuracy = accuracy_on(checkpoint.path, full, device, data)
    get_run_logger().info("eval accuracy %.4f with the %d leaked images", accuracy, len(validated.dropped_leaked))
    return LeakedEvalOutput(accuracy=accuracy)


@cached_task(checkpoint=by_sha256, task_run_name=run_name("export {checkpoint_name}"))
def export_checkpoint(checkpoint: FileRef, run_dir: str) -> ExportOutput:
    """Export the checkpoint's weights (safetensors) and spec (json) for serving."""
    with written_files(run_dir) as files:
        weights_sha256 = export_into(run_dir, checkpoint.path)
    return ExportOutput(weights_sha256=weights_sha256, files=files)
