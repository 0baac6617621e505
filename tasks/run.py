"""Run bookkeeping tasks: open the run directory, write the final manifest, publish the run's
artifacts, record a failure, remove old runs (retention), and reproduce a run. Never cached:
they describe this run, not a reusable result."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from tasks.artifacts import (
    CONFUSION_KEY,
    DATA_CHANGES_KEY,
    MISCLASSIFIED_KEY,
    NEAR_DUPLICATES_KEY,
    PER_CLASS_KEY,
    PREVIEW_KEY,
    RUN_DIRECTORY_KEY,
    TENSORBOARD_KEY,
    VALIDATION_KEY,
    publish_image,
    publish_link,
    publish_markdown,
    publish_summary,
    publish_table,
)
from tasks.caching import TaskOutput, record_outcome, result_files, task_outcomes
from tasks.data import DatasetRef, ValidatedData
from tasks.evaluation import EvalOutput, ExportOutput, LeakedEvalOutput
from tasks.model import ModelInfo
from tasks.training import TrainOutput, train_model
from visionflow import retention
from visionflow.champion import data_changes_report
from visionflow.config import PipelineConfig
from visionflow.errors import VisionflowError, one_line
from visionflow.manifest import CheckpointRecord, Manifest, RunStatus, TimingRecord, utc_timestamp
from visionflow.reports import (
    confusion_table,
    per_class_table,
    run_summary_markdown,
    tensorboard_run_url,
    validation_markdown,
)
from visionflow.runs import RunLayout, check_same_data, compare_runs, open_run, reproduction_config
from visionflow.steps import finish_into
from visionflow.train.stopping import StopRequested


class RunInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    run_dir: str  # absolute
    resume_from: str | None  # last.pt of the interrupted run this one continues
    started_time: float  # time.time() of the flow run's start, for the total duration


@task(cache_policy=NO_CACHE, on_completion=[record_outcome], task_run_name="start run")
def start_run(config: PipelineConfig) -> RunInfo:
    """Create the run directory (or reopen an interrupted one) and write its 'running' manifest."""
    # The run's clock starts with the flow run (data preparation included), not with this task.
    context = FlowRunContext.get()
    started = context.start_time if context is not None else datetime.now(timezone.utc)
    layout, resume_from = open_run(config, utc_timestamp(started), flow_run.get_id(), proposed=flow_run.get_name())
    get_run_logger().info("run %s in %s%s", layout.name, layout.root, " (resuming)" if resume_from else "")
    return RunInfo(
        run_dir=str(layout.root.resolve()),
        resume_from=str(resume_from) if resume_from else None,
        started_time=started.timestamp(),
    )


@task(cache_policy=NO_CACHE, task_run_name="finish run")
def finish_run(
    run: RunInfo,
    dataset: DatasetRef,
    validated: ValidatedData,
    preview: TaskOutput,
    model: ModelInfo,
    training: TrainOutput,
    evaluation: EvalOutput,
    with_leaked: LeakedEvalOutput,
    export: ExportOutput,
) -> Manifest:
    """Hard-link cached results' files into the run, then write the completed manifest and the run's
    hyperparameters with its final metrics (TensorBoard)."""
    for output in (validated, preview, model, training, evaluation, export):
        output.adopted_into(run.run_dir)
    best = RunLayout(Path(run.run_dir)).best_checkpoint
    outcomes = task_outcomes()
    manifest = Manifest.load(run.run_dir)
    manifest = manifest.finish(
        "completed",
        config=training.used_config(manifest.config),
        data=validated.record(dataset),
        model=model.record,
        metrics=evaluation.metrics(training, with_leaked),
        device=training.fit.device,
        distributed=training.fit.distributed,
        weights_sha256=export.weights_sha256,
        timing=training.timing(
            time.time() - run.started_time, trained_here=outcomes.get(train_model.name) == "completed"
        ),
        checkpoint=CheckpointRecord(path=str(best), sha256=training.best_checkpoint.sha256),
        tasks=outcomes,
        resumed_from=run.resume_from,
    )
    return finish_into(run.run_dir, manifest)


@task(cache_policy=NO_CACHE, task_run_name="publish run")
def publish_run(run: RunInfo, manifest: Manifest) -> None:
    """Publish the run's Prefect artifacts: summary, validation, per-class and confusion tables, data
    changes (against the champion's data or the previous run's), links to the run directory (and
    to its curves, with output.tensorboard_url), images (and the worst near-duplicate pairs, with
    data.near_duplicates)."""
    layout = RunLayout(Path(run.run_dir))
    evaluated = json.loads(layout.evaluation.read_text())
    publish_summary(run_summary_markdown(manifest, layout.root))
    publish_markdown(
        VALIDATION_KEY, validation_markdown(json.loads(layout.validation.read_text())), "Dataset validation"
    )
    publish_table(PER_CLASS_KEY, per_class_table(evaluated), "Per-class precision, recall, F1")
    publish_table(
        CONFUSION_KEY,
        confusion_table(evaluated["confusion_matrix"], evaluated["classes"]),
        "Confusion matrix (rows: true class)",
    )
    output = manifest.config.output
    publish_markdown(DATA_CHANGES_KEY, *data_changes_report(layout.root, output.output_dir, output.champion))
    publish_link(RUN_DIRECTORY_KEY, layout.root.resolve().as_uri(), str(layout.root.resolve()), "Run directory")
    if output.tensorboard_url:
        url = tensorboard_run_url(output.tensorboard_url, layout.name)
        publish_link(TENSORBOARD_KEY, url, url, "The run's curves in TensorBoard")
    publish_image(PREVIEW_KEY, layout.preview, "Transform preview: original | eval input | train input")
    publish_image(MISCLASSIFIED_KEY, layout.misclassified_png, "Most confidently wrong eval images")
    if manifest.data is not None and manifest.data.eval_leakage_rate is not None:  # data.near_duplicates
        rate = f"{manifest.data.eval_leakage_rate:.2%} of {manifest.data.eval_split} leaked"
        publish_image(NEAR_DUPLICATES_KEY, layout.near_duplicates_png, f"Worst near-duplicate pairs ({rate})")


@task(cache_policy=NO_CACHE, task_run_name="mark run {status}")
def fail_run(run: RunInfo, error: str, status: RunStatus = "failed") -> None:
    """Mark the run failed (or timed_out) in its manifest, with the error, and publish that as the summary."""
    manifest = Manifest.load(run.run_dir).finish(
        status, timing=TimingRecord(total_seconds=time.time() - run.started_time), tasks=task_outcomes(), error=error
    )
    manifest.save(run.run_dir)
    publish_summary(run_summary_markdown(manifest, run.run_dir))


def last_epoch(run: RunInfo) -> int:
    """The epoch the run's last.pt holds (0 before the first checkpoint): where a rerun resumes."""
    from visionflow.checkpoints import load_checkpoint  # torch: only when a run stopped

    last = RunLayout(Path(run.run_dir)).last_checkpoint
    return load_checkpoint(last)["epoch"] if last.is_file() else 0


def cancelled_through_prefect() -> bool:
    """Whether this flow run is being cancelled through Prefect (the UI, the API): its state is
    Cancelling (a worker then sends the flow-run process SIGTERM) or already Cancelled."""
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run.get_id())).state
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def record_interruption(run: RunInfo, reason: BaseException) -> None:
    """Mark the run interrupted (cancelled, when Prefect cancelled it) in its manifest, with the
    epoch its last.pt holds. A plain call, not a task: the flow run is being torn down (Ctrl-C,
    SIGTERM) and no task can start now."""
    status: RunStatus = "interrupted"
    cause = type(reason).__name__
    if isinstance(reason, StopRequested):  # SIGHUP, or SIGTERM outside Prefect's handler
        cause = signal.Signals(reason.signal).name
    if isinstance(reason, TerminationSignal):  # SIGTERM: a process manager, `timeout`, or a worker cancelling
        cause = signal.Signals(reason.signal).name
        status = "cancelled" if cancelled_through_prefect() else "interrupted"
    manifest = Manifest.load(run.run_dir).finish(
        status,
        timing=TimingRecord(total_seconds=time.time() - run.started_time),
        tasks=task_outcomes(),
        error=f"{status} by {cause} after epoch {last_epoch(run)}; rerun with the same run name to resume",
    )
    manifest.save(run.run_dir)


@contextmanager
def failure_recorded(run: RunInfo) -> Iterator[None]:
    """A step that fails inside the block marks the run failed (`fail_run`), a timeout marks it
    timed_out, a stop from outside (Ctrl-C, SIGTERM, a Prefect cancellation) interrupted or
    cancelled; the error goes on (a TimeoutError ends the flow run TimedOut)."""
    try:
        yield
    except TimeoutError as err:  # training.timeout_minutes, or a task's own timeout
        error = f"{one_line(err)}; timed out after epoch {last_epoch(run)}"
        fail_run(run, f"{error}; rerun with the same run name to resume", "timed_out")
        raise
    except Exception as err:
        fail_run(run, one_line(err))
        raise
    except BaseException as stop:
        record_interruption(run, stop)
        raise


@task(cache_policy=NO_CACHE, task_run_name="collect garbage")
def collect_garbage(config: PipelineConfig, run: RunInfo) -> None:
    """With output.keep_last or output.keep_days set: remove old runs and their orphaned cached
    results (visionflow.retention), never this run. A problem is a warning: the run completed."""
    output = config.output
    if output.keep_last is None and output.keep_days is None:
        return
    logger = get_run_logger()
    try:
        plan = retention.collect_garbage(
            output.output_dir,
            output.keep_last,
            output.keep_days,
            keep={Path(run.run_dir).name},
            result_files=result_files,
        )
    except (VisionflowError, OSError) as err:
        logger.warning("gc skipped: %s", one_line(err))
        return
    for line in plan.format_text().splitlines():
        logger.info("gc: %s", line)


class Reproduction(BaseModel):
    """A completed run to rerun: its manifest and the config that reruns it."""

    model_config = ConfigDict(frozen=True)
    manifest: Manifest
    config: PipelineConfig


@task(cache_policy=NO_CACHE)
def plan_reproduction(run_dir: str) -> Reproduction:
    """Read a run's manifest and derive the config that reruns it, caches bypassed."""
    manifest = Manifest.load(run_dir)
    return Reproduction(manifest=manifest, config=reproduction_config(manifest, run_dir))


@task(cache_policy=NO_CACHE)
def check_reproducible(plan: Reproduction, dataset: DatasetRef) -> None:
    """Refuse to reproduce on data that differs from what the run trained on."""
    check_same_data(plan.manifest, dataset.fingerprint)


@task(cache_policy=NO_CACHE)
def compare_reproduction(plan: Reproduction, reproduced: Manifest) -> dict[str, Any]:
    """Compare the rerun's weights and metrics with the original's."""
    comparison = compare_runs(plan.manifest, reproduced)
    get_run_logger().info(
        "reproduction of %s: weights %s",
        comparison["original_run"],
        "identical" if comparison["identical"] else "DIFFER",
    )
    return comparison
