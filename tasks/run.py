"""Run bookkeeping tasks: create the run directory, write the manifest, publish the run's
artifacts. Never cached: they describe this run, not a reusable result."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from tasks.artifacts import (CONFUSION_KEY, MISCLASSIFIED_KEY, PER_CLASS_KEY, PREVIEW_KEY, VALIDATION_KEY,
                             publish_image, publish_markdown, publish_summary, publish_table)
from tasks.data import DatasetRef, ValidatedData
from tasks.evaluation import MISCLASSIFIED_PNG, EvalOutput, ExportOutput
from tasks.model import ModelInfo
from tasks.training import BEST, TrainOutput
from visionflow.config import PipelineConfig
from visionflow.reports import confusion_frame, per_class_frame, run_summary_markdown, validation_markdown
from visionflow.runs import (RunLayout, build_manifest, check_same_data, compare_runs, create_run_dir, read_manifest,
                             reproduction_config, write_manifest)
from visionflow.tensorboard import log_hparams


class RunInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    run_name: str
    run_dir: str  # absolute
    resume_from: str | None  # last.pt of the interrupted run this one continues
    started_at: str  # ISO 8601, UTC
    started_time: float  # time.time(), for the total duration


@task(cache_policy=NO_CACHE)
def start_run(config: PipelineConfig) -> RunInfo:
    """Create the run directory (or reopen an interrupted one) and write its 'running' manifest."""
    # The run's clock starts with the flow run (data preparation included), not with this task.
    context = FlowRunContext.get()
    started = context.start_time if context is not None else datetime.now(timezone.utc)
    layout, resumed = create_run_dir(config.output.output_dir, config.output.run_name, config.data.dataset,
                                     config.model.name, proposed=flow_run.get_name())
    resume_from = layout.last_checkpoint if resumed and layout.last_checkpoint.is_file() else None
    run = RunInfo(run_name=layout.name, run_dir=str(layout.root.resolve()),
                  resume_from=str(resume_from) if resume_from else None,
                  started_at=started.isoformat(timespec="seconds"), started_time=started.timestamp())
    write_manifest(layout.root, build_manifest(run.run_name, config.resolved().model_dump(mode="json"), "running",
                                               started_at=run.started_at, prefect_flow_run_id=flow_run.get_id()))
    get_run_logger().info("run %s in %s%s", run.run_name, run.run_dir, " (resuming)" if resumed else "")
    return run


def _resolved_config(config: PipelineConfig, training: TrainOutput) -> dict[str, Any]:
    """The config as the run used it: recipe fields filled, normalization as computed."""
    values = config.resolved().model_dump(mode="json")
    values["data"].update(mean=training.spec["mean"], std=training.spec["std"])
    return values


@task(cache_policy=NO_CACHE)
def finish_run(run: RunInfo, config: PipelineConfig, dataset: DatasetRef, validated: ValidatedData, model: ModelInfo,
               training: TrainOutput, evaluation: EvalOutput, export: ExportOutput, tasks: dict[str, str]) -> dict[str, Any]:
    """Write the completed manifest and the run's hyperparameters with its final metrics (TensorBoard)."""
    layout = RunLayout(Path(run.run_dir))
    resolved = _resolved_config(config, training)
    best = training.files[BEST]
    manifest = build_manifest(
        run.run_name, resolved, "completed", started_at=run.started_at, prefect_flow_run_id=flow_run.get_id(),
        data={"spec": dataset.source.dataset, "root": dataset.root, "fingerprint": dataset.fingerprint,
              "validated_fingerprint": validated.fingerprint, "num_train": validated.num_train,
              "num_eval": validated.num_eval, "eval_split": validated.eval_split, "classes": list(dataset.classes),
              "excluded": list(validated.excluded)},
        model={"name": model.name, "num_parameters": model.num_parameters,
               "trainable_parameters": model.trainable_parameters},
        metrics={"eval_accuracy": evaluation.accuracy, "eval_loss": evaluation.loss, "eval_top5": evaluation.top5,
                 "best_epoch": training.best_epoch, "epochs_trained": len(training.history),
                 "per_class": evaluation.per_class},
        timing={"train_seconds": training.train_seconds, "train_images_per_second": training.train_images_per_second,
                "total_seconds": time.time() - run.started_time},
        checkpoint={"path": best.path, "sha256": best.sha256},
        weights_sha256=export.weights_sha256, tasks=tasks, device=training.device, resumed_from=run.resume_from)
    write_manifest(layout.root, manifest)
    log_hparams(layout.tensorboard, resolved, {"eval_accuracy": evaluation.accuracy, "eval_loss": evaluation.loss})
    return manifest


@task(cache_policy=NO_CACHE)
def publish_run(run: RunInfo, manifest: dict[str, Any]) -> None:
    """Publish the run's Prefect artifacts: summary, validation, per-class and confusion tables, images."""
    layout = RunLayout(Path(run.run_dir))
    evaluated = json.loads(layout.evaluation.read_text())
    publish_summary(run_summary_markdown(manifest, layout.root))
    publish_markdown(VALIDATION_KEY, validation_markdown(json.loads(layout.validation.read_text())), "Dataset validation")
    publish_table(PER_CLASS_KEY, per_class_frame(evaluated), "Per-class precision, recall, F1")
    publish_table(CONFUSION_KEY, confusion_frame(evaluated["confusion_matrix"], evaluated["classes"]),
                  "Confusion matrix (rows: true class)")
    publish_image(PREVIEW_KEY, layout.preview, "Transform preview: original | eval input | train input")
    publish_image(MISCLASSIFIED_KEY, layout.root / MISCLASSIFIED_PNG, "Most confidently wrong eval images")


@task(cache_policy=NO_CACHE)
def fail_run(run: RunInfo, config: PipelineConfig, error: str, tasks: dict[str, str]) -> None:
    """Mark the run failed in its manifest, with the error, and publish that as the summary."""
    layout = RunLayout(Path(run.run_dir))
    manifest = build_manifest(run.run_name, config.resolved().model_dump(mode="json"), "failed",
                              started_at=run.started_at, prefect_flow_run_id=flow_run.get_id(), tasks=tasks,
                              timing={"total_seconds": time.time() - run.started_time}, error=error)
    write_manifest(layout.root, manifest)
    publish_summary(run_summary_markdown(manifest, layout.root))


class Reproduction(BaseModel):
    """A completed run to rerun: its manifest and the config that reruns it."""

    model_config = ConfigDict(frozen=True)
    manifest: dict[str, Any]
    config: PipelineConfig


@task(cache_policy=NO_CACHE)
def plan_reproduction(run_dir: str) -> Reproduction:
    """Read a run's manifest and derive the config that reruns it, caches bypassed."""
    manifest = read_manifest(run_dir)
    return Reproduction(manifest=manifest, config=reproduction_config(manifest, run_dir))


@task(cache_policy=NO_CACHE)
def check_reproducible(plan: Reproduction, dataset: DatasetRef) -> None:
    """Refuse to reproduce on data that differs from what the run trained on."""
    check_same_data(plan.manifest, dataset.fingerprint)


@task(cache_policy=NO_CACHE)
def compare_reproduction(plan: Reproduction, reproduced: dict[str, Any]) -> dict[str, Any]:
    """Compare the rerun's weights and metrics with the original's."""
    comparison = compare_runs(plan.manifest, reproduced)
    get_run_logger().info("reproduction of %s: weights %s", comparison["original_run"],
                          "identical" if comparison["identical"] else "DIFFER")
    return comparison
