"""What training reports, without torch: the model spec, the records `fit` returns and streams to
its callbacks, and the `Callback` hooks. Cached task results hold these records, so a fully cached
run reads them back without importing torch (~2 s of every command's start)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from visionflow.config import PipelineConfig, decode_size
from visionflow.errors import ConfigError
from visionflow.manifest import DistributedRecord

if TYPE_CHECKING:
    from torch import nn


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and preprocess its input, saved beside its weights."""

    name: str
    num_classes: int
    input_size: int  # pixels, square
    class_names: list[str]
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # per channel, on [0, 1] pixels
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    test_flip: bool = False  # logits averaged with the mirror image's at evaluation and prediction
    crop_pct: float = 1.0  # resize to input_size / crop_pct, center-crop input_size (config.decode_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        values = {"test_flip": False, "crop_pct": 1.0, **values}  # specs saved before these existed
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        missing = sorted(set(cls.__dataclass_fields__) - set(known))
        if missing:
            raise ConfigError(f"Model spec is missing {', '.join(missing)}")
        return cls(**known)

    @classmethod
    def of(cls, config: PipelineConfig, classes: Sequence[str]) -> "ModelSpec":
        """The spec a resolved config trains for `classes` (fit fills in the normalization)."""
        data = config.data
        return cls(config.model.name, len(classes), data.image_size, list(classes), crop_pct=data.crop_pct)

    @property
    def decode_size(self) -> int:
        """Pixels of the square images this model's input is center-cropped from."""
        return decode_size(self.input_size, self.crop_pct)

    def build(self) -> nn.Module:
        from visionflow.models import build_model  # torch

        return build_model(self.name, self.num_classes)


@dataclass
class EpochMetrics:
    """One epoch's figures, as callbacks, the history and checkpoints see them."""

    epoch: int  # 1-based
    step: int  # optimizer steps so far
    train_loss: float  # mean per image, with label smoothing
    train_accuracy: float  # fraction in [0, 1], on augmented batches
    eval_loss: float  # mean cross-entropy per image, no smoothing
    eval_accuracy: float  # fraction in [0, 1]
    lr: float  # after the epoch's last step
    images_per_second: float  # training images / training-loop seconds
    seconds: float  # training loop + evaluation, wall clock


ACCURACY_MILESTONES = (0.5, 0.6, 0.7)  # eval accuracies whose time to reach a run records


def time_to_accuracy(
    history: Sequence[EpochMetrics], milestones: Sequence[float] = ACCURACY_MILESTONES
) -> dict[str, dict[str, float] | None]:
    """For each milestone ('50%'...): the first epoch whose eval accuracy reached it and the
    training seconds (loops and per-epoch evaluation) until the end of that epoch; None if none did."""
    reached: dict[str, dict[str, float] | None] = {f"{m:.0%}": None for m in milestones}
    seconds = 0.0
    for metrics in history:
        seconds += metrics.seconds
        for milestone in milestones:
            if reached[f"{milestone:.0%}"] is None and metrics.eval_accuracy >= milestone:
                reached[f"{milestone:.0%}"] = {"epoch": metrics.epoch, "seconds": seconds}
    return reached


@dataclass
class TrainStats:
    """What `train_one_epoch` returns."""

    loss: float  # mean per image
    accuracy: float  # fraction in [0, 1]
    images: int
    seconds: float  # wall clock of the loop, device synced
    step: int  # optimizer steps so far, after this epoch


@dataclass
class FitResult:
    """What `fit` returns (and `Callback.on_fit_end` receives)."""

    history: list[EpochMetrics]
    best_metric: float | None  # value of config.training.monitor at best_epoch
    best_epoch: int | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    train_seconds: float  # training loops only (no evaluation, no checkpoint writes), all sessions
    train_images_per_second: float
    weights_sha256: str  # of the final weights
    stopped_early: bool
    device: str
    spec: ModelSpec  # the input spec with the normalization the run used
    precision: str  # fp32 or bf16: what training.precision (auto) meant on this device
    channels_last: bool  # what training.channels_last (auto) meant
    # memory or stream: what data.loader (auto) meant; results cached before the stream loader existed: memory
    loader: str = "memory"
    distributed: DistributedRecord | None = None  # the ranks of a data-parallel run; None = one process
    # Seconds by phase (engine.EPOCH_PHASES: data, forward, backward, optimizer, evaluation,
    # checkpoint, callbacks) over the `timed_epochs` epochs the last training session ran.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    timed_epochs: int = 0


@dataclass
class FitStart:
    """What `Callback.on_fit_start` receives; `epoch`/`step` are nonzero when resuming."""

    epoch: int  # last finished epoch (0 for a fresh run)
    step: int  # optimizer steps already taken
    epochs: int  # config.training.epochs
    steps_per_epoch: int
    train_images: int
    eval_images: int
    device: str
    config: dict[str, Any]  # resolved, with the normalization the run uses
    spec: dict[str, Any]
    history: list[EpochMetrics] = field(default_factory=list)  # epochs finished before (when resuming)


class Callback:
    """Hooks into `fit`; override what you need. Steps are reported every `every_n_steps` steps.

    on_step_end costs one device sync (to read the loss) each time it is called, so it is only
    called for callbacks that override it.
    """

    every_n_steps: int = 1

    def on_fit_start(self, state: FitStart) -> None:
        """Before the first (or first resumed) epoch."""

    def on_step_end(self, step: int, loss: float, lr: float) -> None:
        """After optimizer step `step` (1-based, counted across epochs); `loss` of that batch."""

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        """After the epoch is evaluated and its checkpoints are written."""

    def on_fit_end(self, result: FitResult) -> None:
        """After the last epoch (or early stop)."""
