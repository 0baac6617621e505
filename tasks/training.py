"""Training task: fit the model on the validated data, checkpointing into the run directory."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger

from tasks.artifacts import PrefectProgressCallback
from tasks.caching import FileRef, TaskOutput, cached_task, written_files
from tasks.data import DatasetRef, Normalization, ValidatedData, by_exclusions, by_fingerprint
from tasks.names import run_name
from visionflow.config import PipelineConfig, world_size
from visionflow.manifest import TimingRecord
from visionflow.records import FitResult
from visionflow.runs import BEST_CHECKPOINT_PATH, LAST_CHECKPOINT_PATH
from visionflow.steps import train_run


class TrainOutput(TaskOutput):
    fit: FitResult

    @property
    def best_checkpoint(self) -> FileRef:
        return self.files[BEST_CHECKPOINT_PATH]

    def used_config(self, config: PipelineConfig) -> PipelineConfig:
        """`config` (resolved) with the normalization, precision and memory format this training used."""
        data = config.data.model_copy(update={"mean": self.fit.spec.mean, "std": self.fit.spec.std})
        training = config.training.model_copy(
            update={"precision": self.fit.precision, "channels_last": self.fit.channels_last}
        )
        return config.model_copy(update={"data": data, "training": training})

    def timing(self, total_seconds: float, trained_here: bool) -> TimingRecord:
        """The manifest's timing of a flow run that took `total_seconds`; `trained_here`: this training
        ran in that flow run (not cached), so its epochs' phases belong to it."""
        fit = self.fit
        trained = fit.phase_seconds if trained_here and fit.timed_epochs else {}
        return TimingRecord(
            train_seconds=fit.train_seconds,
            train_images_per_second=fit.train_images_per_second,
            total_seconds=total_seconds,
            seconds_per_epoch={phase: seconds / fit.timed_epochs for phase, seconds in trained.items()},
            other_seconds=total_seconds - sum(trained.values()),
        )


def by_training_fields(config: PipelineConfig) -> dict[str, Any]:
    """What training depends on: the whole config except where data and outputs live, the time
    limit (a run that finishes within it trains the same weights) and where ranks meet; the world
    size instead of how it is spelt (nproc_per_node 'gpu' counted on this machine)."""
    meeting = {"nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id"}
    fields = config.model_dump(
        mode="json",
        exclude={
            "output": True,
            "data": {"dataset", "data_dir"},
            "training": {"timeout_minutes": True, "distributed": meeting},
        },
    )
    fields["training"]["distributed"]["world_size"] = world_size(config.training.distributed)
    return fields


class _LogStream:
    """A text stream that forwards each line to a logger."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                self.logger.info(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@cached_task(
    "normalization",
    dataset=by_fingerprint,
    validated=by_exclusions,
    config=by_training_fields,
    task_run_name=run_name("train {config.model.name} on {dataset_name}"),
)
def train_model(
    dataset: DatasetRef,
    validated: ValidatedData,
    config: PipelineConfig,
    normalization: Normalization,
    run_dir: str,
    resume_from: str | None = None,
) -> TrainOutput:
    """Train with checkpoints (last.pt every epoch, best.pt), TensorBoard curves and a progress artifact."""
    logger = get_run_logger()
    if resume_from:
        logger.info("resuming from %s", resume_from)
    config = config.model_copy(update={"data": normalization.apply(config.data)})
    with written_files(run_dir, LAST_CHECKPOINT_PATH, BEST_CHECKPOINT_PATH) as files:
        result = train_run(
            run_dir,
            validated.apply(dataset),
            config,
            resume_from,
            callbacks=[PrefectProgressCallback(config.training.epochs)],
            progress_stream=_LogStream(logger),
        )  # epoch lines once, in the run log
    return TrainOutput(fit=result, files=files)
