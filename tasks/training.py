"""Training task: fit the model on the validated data, checkpointing into the run directory."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.artifacts import PrefectProgressCallback
from tasks.caching import TaskOutput, created_files, outputs_in, verified_cache
from tasks.data import DatasetRef, ValidatedData, by_exclusions, by_fingerprint
from visionflow.cache import load_decoded
from visionflow.config import PipelineConfig
from visionflow.engine import fit, seed_everything
from visionflow.models import ModelSpec
from visionflow.runs import RunLayout
from visionflow.tensorboard import TensorBoardCallback

LAST, BEST = "checkpoints/last.pt", "checkpoints/best.pt"  # run-directory-relative, as RunLayout has them
TRAINING_MODULES = ("visionflow.engine", "visionflow.transforms", "visionflow.models", "visionflow.cache",
                    "visionflow.checkpoints", "visionflow.tensorboard")


class TrainOutput(TaskOutput):
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_metric: float | None
    train_seconds: float
    train_images_per_second: float
    weights_sha256: str  # of the final weights
    stopped_early: bool
    device: str
    spec: dict[str, Any]  # ModelSpec with the normalization the run used


def by_training_fields(config: PipelineConfig) -> dict[str, Any]:
    """What training depends on: the whole config except where data and outputs live."""
    return config.model_dump(mode="json", exclude={"output": True, "data": {"dataset", "data_dir", "num_workers"}})


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


@task(cache_policy=verified_cache(dataset=by_fingerprint, validated=by_exclusions, config=by_training_fields,
                                  modules=TRAINING_MODULES))
def train_model(dataset: DatasetRef, validated: ValidatedData, config: PipelineConfig, run_dir: str,
                resume_from: str | None = None) -> TrainOutput:
    """Train with checkpoints (last.pt every epoch, best.pt), TensorBoard curves and a progress artifact."""
    layout = RunLayout(Path(run_dir))
    info = validated.apply(dataset.load())
    cache_dir = Path(config.data.data_dir) / "cache"
    train = load_decoded(info.train, config.data.image_size, cache_dir)
    evaluation = load_decoded(info.eval_split, config.data.image_size, cache_dir)
    spec = ModelSpec(config.model.name, len(info.classes), config.data.image_size, list(info.classes))
    callbacks = [TensorBoardCallback(layout.tensorboard), PrefectProgressCallback(config.training.epochs)]
    if resume_from:
        get_run_logger().info("resuming from %s", resume_from)
    seed_everything(config.training.seed)  # before building: the initial weights are part of the result
    model = spec.build()
    with created_files(run_dir, layout.tensorboard) as events:
        result = fit(model, train, evaluation, config, spec, checkpoint_dir=layout.checkpoints,
                     resume_from=Path(resume_from) if resume_from else None, callbacks=callbacks,
                     progress_stream=_LogStream(get_run_logger()))  # epoch lines once, in the run log
    return TrainOutput(history=[asdict(m) for m in result.history], best_epoch=result.best_epoch,
                       best_metric=result.best_metric, train_seconds=result.train_seconds,
                       train_images_per_second=result.train_images_per_second, weights_sha256=result.weights_sha256,
                       stopped_early=result.stopped_early, device=result.device, spec=result.spec.to_dict(),
                       files={**outputs_in(run_dir, [LAST, BEST]), **events})
