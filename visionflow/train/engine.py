"""Training engine: the building blocks `train_one_epoch`, `collect_logits`, `loss_and_accuracy` and `fit`
(the torchvision references' layout), with callbacks, progress and resumable checkpoints. No
Prefect here: flows observe training through `Callback`.

Inside a torch.distributed process group (torchrun: `visionflow.train.ddp_worker`) the same `fit` trains
data-parallel: data.batch_size is the global batch, every rank draws the same permutation and
augmentation and trains on its slice, DDP averages the gradients, rank 0 evaluates and alone
writes checkpoints and progress (`visionflow.train.distributed`).

`fit` takes decoded splits (uint8 (N, 3, H, W) tensors) and builds the run from the core
modules: the device and precision (`visionflow.train.device`), the seeded random streams
(`visionflow.train.rng`), on-device batches (`visionflow.data.loaders`) and the optimizer and per-batch
schedule (`visionflow.train.optim`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from visionflow import checkpoints
from visionflow.checkpoints import TrainingCheckpoint
from visionflow.config import (
    PipelineConfig,
    check_global_batch,
    flatten,
    free_fields,
    is_improvement,
    stored_fields,
)
from visionflow.data.decoded import FileSplit
from visionflow.data.loaders import Batches, eval_batches, make_loader, sample_images, with_train_statistics
from visionflow.data.transforms import BatchTransform
from visionflow.errors import CheckpointError, ConfigError, DatasetError, DeviceError
from visionflow.models import head_name, is_head, whiten_first_conv, whiten_images
from visionflow.runs import BEST_CHECKPOINT, LAST_CHECKPOINT
from visionflow.train.autotune import BF16_SLOWDOWN_WARNING, bf16_slowdown, cpu_name, fast_settings, native_bf16
from visionflow.train.device import autocast, resolve_device
from visionflow.train.distributed import (
    Ranks,
    data_parallel,
    describe,
    from_main,
    sum_over_ranks,
    wait_for_main,
)
from visionflow.train.optim import build_optimizer, build_scheduler
from visionflow.train.records import Callback, EpochMetrics, FitResult, FitStart, ModelSpec, TrainStats
from visionflow.train.rng import Generators, restore_rng_state, rng_state
from visionflow.train.stopping import StopGuard

log = logging.getLogger(__name__)
_PROGRESS_INTERVAL = 0.25  # seconds between progress-bar redraws (each redraw is one device sync)

# ---------------------------------------------------------------------------------------------
# Callbacks and progress


def _step_listeners(callbacks: Sequence[Callback]) -> list[Callback]:
    return [cb for cb in callbacks if type(cb).on_step_end is not Callback.on_step_end]


class Progress:
    """Training progress on `stream`: a throttled carriage-return bar on a TTY, else one line per epoch."""

    def __init__(self, epochs: int, stream: TextIO | None = None):
        self.epochs, self.stream = epochs, stream or sys.stderr
        self.live = self.stream.isatty()
        self._drawn = 0.0  # time.perf_counter() of the last redraw

    def update(
        self, epoch: int, batch: int, batches: int, loss_sum: Tensor, correct: Tensor, images: int, seconds: float
    ) -> None:
        """Redraw the bar (TTY only, at most every _PROGRESS_INTERVAL s) from the on-device running sums."""
        now = time.perf_counter()
        if not self.live or now - self._drawn < _PROGRESS_INTERVAL:
            return
        self._drawn = now
        self.stream.write(
            f"\repoch {epoch}/{self.epochs} [{batch}/{batches}] loss {loss_sum.item() / images:.4f} "
            f"acc {correct.item() / images:.3f} {images / seconds:,.0f} img/s"
        )
        self.stream.flush()

    def epoch_end(self, m: EpochMetrics) -> None:
        """The epoch's summary line (replacing the bar on a TTY)."""
        line = (
            f"epoch {m.epoch}/{self.epochs} train_loss {m.train_loss:.4f} train_acc {m.train_accuracy:.3f} "
            f"eval_loss {m.eval_loss:.4f} eval_acc {m.eval_accuracy:.3f} lr {m.lr:.3g} "
            f"{m.images_per_second:,.0f} img/s {m.seconds:.1f}s"
        )
        self.stream.write(("\r\033[K" if self.live else "") + line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Building blocks

# Where an epoch's time goes, in order (FitResult.phase_seconds): "callbacks" is step listeners, the
# progress bar and the epoch-end callbacks (TensorBoard, a flow's artifacts and log lines).
EPOCH_PHASES = ("data", "forward", "backward", "optimizer", "evaluation", "checkpoint", "callbacks")


class PhaseTimer:
    """Seconds per phase of the training loop, with no host sync of its own: on CUDA each boundary
    records an event on the stream (GPU time; read by `totals`, after the epoch's sync), elsewhere the
    host clock (CPU kernels run synchronously; on MPS host time)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(EPOCH_PHASES, 0.0)
        self._pending: list[tuple[str, Any, Any]] = []  # (phase, start event, end event), CUDA
        self._last = self._now()

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, phase: str) -> None:
        """The time since the previous lap (or since the timer started) was spent in `phase`."""
        now = self._now()
        if self.cuda:
            self._pending.append((phase, self._last, now))
        else:
            self.seconds[phase] += now - self._last
        self._last = now

    def restart(self) -> None:
        """Start the next lap now: what ran since the previous lap (an epoch's set-up) is in no phase."""
        self._last = self._now()

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far (EPOCH_PHASES order). CUDA: waits for the last event (a CPU-GPU sync point)."""
        if self._pending:
            self._pending[-1][2].synchronize()
        for phase, start, end in self._pending:
            self.seconds[phase] += start.elapsed_time(end) / 1000  # elapsed_time: milliseconds
        self._pending.clear()
        return dict(self.seconds)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    precision: str = "fp32",
    grad_clip: float = 0.0,
    epoch: int = 1,
    step: int = 0,
    callbacks: Sequence[Callback] = (),
    progress: Progress | None = None,
    stop: StopGuard | None = None,
    timer: PhaseTimer | None = None,
    frozen: Sequence[nn.Module] = (),
) -> TrainStats:
    """One pass over model-ready `batches`; the scheduler steps per batch; `grad_clip` 0 = off; `stop`
    is checked after every batch (a held Ctrl-C or a deadline ends the epoch there); `timer` gets each
    step's phase times; `frozen` modules stay in eval mode (a frozen backbone's BatchNorm statistics)."""
    timer = timer or PhaseTimer(device)
    model.train()
    for module in frozen:
        module.eval()
    # Running sums (per-image losses, correct predictions) stay on the device: .item() would sync every step.
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device)
    images, listeners, start = 0, _step_listeners(callbacks), time.perf_counter()
    timer.restart()  # the phases are parts of this loop, as train_seconds times it
    for batch, (inputs, labels) in enumerate(batches, 1):
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        timer.lap("data")
        with autocast(device, precision):
            logits = model(inputs)  # (B, num_classes)
            loss = criterion(logits, labels)
        timer.lap("forward")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        timer.lap("backward")
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        timer.lap("optimizer")
        step += 1
        loss_sum += loss.detach().float() * labels.shape[0]
        correct += (logits.argmax(1) == labels).sum()
        images += labels.shape[0]
        for cb in listeners:
            if step % cb.every_n_steps == 0:
                cb.on_step_end(step, loss.item(), optimizer.param_groups[0]["lr"])
        if progress is not None:
            progress.update(epoch, batch, len(batches), loss_sum, correct, images, time.perf_counter() - start)
        if stop is not None:
            stop.check()  # host-side only: no device sync
        timer.lap("callbacks")
    # Sums over every rank's slice in a distributed run; the epoch's one sync.
    totals = sum_over_ranks(torch.stack([loss_sum, correct.float(), torch.tensor(float(images), device=device)]))
    loss_total, correct_total, count = totals.tolist()
    return TrainStats(loss_total / count, correct_total / count, int(count), time.perf_counter() - start, step)


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    precision: str = "fp32",
    stop: StopGuard | None = None,
    flip: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run `model` (eval mode) over model-ready `batches`: (N, C) float32 logits and (N,) labels, on CPU;
    `flip` averages each image's logits with its mirror image's (test-time flip, two forward passes);
    `stop` is checked after every batch."""
    model.eval()
    all_logits, all_labels = [], []
    for inputs, labels in batches:
        inputs = inputs.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(inputs).float()  # (B, C)
            if flip:
                logits = (logits + model(inputs.flip(-1)).float()) / 2  # flip(-1): mirror the width
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
        if stop is not None:
            stop.check()
    return torch.cat(all_logits), torch.cat(all_labels)


def loss_and_accuracy(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(mean cross-entropy per image, accuracy in [0, 1]) of (N, C) `logits` against (N,) `labels`."""
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# fit: decisions, state, checkpoints


def _should_stop_early(epoch: int, best_epoch: int | None, patience: int | None) -> bool:
    return patience is not None and best_epoch is not None and epoch - best_epoch >= patience


def _is_finished(stored: TrainingCheckpoint, epochs: int) -> bool:
    return stored.epoch >= epochs or stored.metrics["stopped_early"]


@dataclass
class _FitState:
    """What fit carries from epoch to epoch (and through a checkpoint)."""

    epoch: int = 0  # last finished, 1-based
    step: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    train_seconds: float = 0.0
    train_images: int = 0
    stopped_early: bool = False
    improved: bool = False  # whether the last epoch improved the monitored metric

    def metrics(self) -> dict[str, Any]:
        last = asdict(self.history[-1]) if self.history else {}
        return {
            **last,
            "train_seconds": self.train_seconds,
            "train_images": self.train_images,
            "stopped_early": self.stopped_early,
        }

    def record(self, metrics: EpochMetrics, stats: TrainStats, monitor: str, patience: int | None) -> None:
        """Fold a finished epoch in: history, totals, the best `monitor` value and early stopping."""
        self.epoch, self.step = metrics.epoch, stats.step
        self.history.append(metrics)
        self.train_seconds += stats.seconds
        self.train_images += stats.images
        self.improved = is_improvement(getattr(metrics, monitor), self.best_metric, monitor)  # a tie is none
        if self.improved:
            self.best_metric, self.best_epoch = getattr(metrics, monitor), metrics.epoch
        self.stopped_early = _should_stop_early(metrics.epoch, self.best_epoch, patience)

    @classmethod
    def from_checkpoint(cls, stored: TrainingCheckpoint) -> "_FitState":
        totals = {key: stored.metrics[key] for key in ("train_seconds", "train_images", "stopped_early")}
        history = [EpochMetrics(**h) for h in stored.history]
        return cls(stored.epoch, stored.step, history, stored.best_metric, stored.best_epoch, **totals)


def _checkpoint(
    state: _FitState,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    generators: Generators,
    config: PipelineConfig,
    spec: ModelSpec,
    world_size: int,
) -> TrainingCheckpoint:
    return TrainingCheckpoint(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        epoch=state.epoch,
        step=state.step,
        rng=rng_state(generators),
        config=config.model_dump(mode="json"),
        spec=spec.to_dict(),
        metrics=state.metrics(),
        history=[asdict(m) for m in state.history],
        best_metric=state.best_metric,
        best_epoch=state.best_epoch,
        world_size=world_size,
    )


def _check_resumable(
    stored: TrainingCheckpoint, config: PipelineConfig, path: Path, device: torch.device, world_size: int
) -> None:
    """Resuming must continue the same computation: same config (up to `config.free_fields`; the
    checkpoint's with the fields added since it was written at what they resolve to), same device
    type, same world size."""
    before, now, free = stored_fields(stored.config), flatten(config.model_dump(mode="json")), free_fields("resume")
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k) and k not in free]
    if changed:
        diffs = ", ".join(f"{k} (checkpoint {before.get(k)!r}, now {now.get(k)!r})" for k in changed[:3])
        raise ConfigError(f"Cannot resume from '{path}': the config differs in {diffs}")
    trained_with = stored.world_size
    if trained_with != world_size:
        raise ConfigError(
            f"Cannot resume '{path}' with world size {world_size}: it was trained with world size {trained_with} "
            "(training.distributed.nproc_per_node x nnodes must match)"
        )
    if stored.rng["augment_device"] != device.type:
        raise DeviceError(
            f"Cannot resume '{path}' on {device.type}: it was trained on "
            f"{stored.rng['augment_device']}, whose random streams cannot continue elsewhere"
        )


def _with_normalization(config: PipelineConfig, train: Any) -> PipelineConfig:
    """Fill data.mean/std left empty with the train split's statistics (recorded in the resolved config)."""
    return config.model_copy(update={"data": with_train_statistics(config.data, train)})


def with_fast_settings(config: PipelineConfig, spec: ModelSpec, device: torch.device) -> PipelineConfig:
    """Fill training.precision and training.channels_last left `auto` with what is fast on `device`
    (visionflow.train.autotune); warn when an explicit bf16 is emulated, and slow, on this CPU."""
    training = config.training
    if "auto" in (training.precision, training.channels_last):
        chosen = fast_settings(device, spec.name, spec.input_size)
        update = {
            "precision": chosen.precision if training.precision == "auto" else training.precision,
            "channels_last": chosen.channels_last if training.channels_last == "auto" else training.channels_last,
        }
        log.info("training.precision %s, channels_last %s (%s)", *update.values(), chosen.reason)
        return config.model_copy(update={"training": training.model_copy(update=update)})
    if training.precision == "bf16" and device.type == "cpu" and not native_bf16():
        slowdown = bf16_slowdown(spec.name, spec.input_size)
        if slowdown >= BF16_SLOWDOWN_WARNING:
            log.warning(
                "training.precision bf16 trains %.1fx slower than fp32 on this CPU (%s: no native bf16); "
                "use precision auto or fp32",
                slowdown,
                cpu_name(),
            )
    return config


def _check_data(train: Any, eval_split: Any, spec: ModelSpec, config: PipelineConfig, ranks: Ranks) -> None:
    for name, split in (("train", train), ("eval", eval_split)):
        if len(split.labels) == 0:
            raise DatasetError(f"The {name} split has no images: training needs at least one in each split")
        if int(split.labels.max()) >= spec.num_classes:
            raise DatasetError(
                f"The {name} split has label {int(split.labels.max())} but the model has "
                f"{spec.num_classes} classes (labels 0..{spec.num_classes - 1})"
            )
    check_global_batch(config.data.batch_size, ranks.world_size)
    if config.data.drop_last and len(train.labels) < config.data.batch_size:
        raise ConfigError(
            f"Invalid config field 'data.batch_size': {config.data.batch_size} with drop_last leaves "
            f"no training batch for {len(train.labels)} images"
        )


def _result(
    state: _FitState,
    model: nn.Module,
    checkpoint_dir: Path | None,
    device: torch.device,
    spec: ModelSpec,
    config: PipelineConfig,
    loader: str,
    phase_seconds: dict[str, float] | None = None,
    timed_epochs: int = 0,
) -> FitResult:
    best = checkpoint_dir / BEST_CHECKPOINT if checkpoint_dir is not None and state.best_epoch is not None else None
    return FitResult(
        history=state.history,
        best_metric=state.best_metric,
        best_epoch=state.best_epoch,
        last_checkpoint=checkpoint_dir / LAST_CHECKPOINT if checkpoint_dir is not None else None,
        best_checkpoint=best,
        train_seconds=state.train_seconds,
        train_images_per_second=state.train_images / state.train_seconds if state.train_seconds else 0.0,
        weights_sha256=checkpoints.weights_sha256(model.state_dict()),
        stopped_early=state.stopped_early,
        device=str(device),
        spec=spec,
        precision=config.training.precision,
        channels_last=config.training.channels_last,
        loader=loader,
        distributed=describe(device),
        phase_seconds=phase_seconds or {},
        timed_epochs=timed_epochs,
    )


@dataclass
class _Run:
    """Everything `fit` builds from the config before the first epoch."""

    model: nn.Module  # the module whose state_dict is saved
    forward: nn.Module  # what eval batches run through: `model`, or torch.compile(model)
    train_forward: nn.Module  # what training batches run through: `forward`, or DDP over it when distributed
    optimizer: Optimizer
    scheduler: LRScheduler
    criterion: nn.Module
    generators: Generators
    train_batches: Batches
    eval_batches: Batches


def _build_run(
    model: nn.Module, train: Any, eval_split: Any, config: PipelineConfig, device: torch.device, ranks: Ranks
) -> _Run:
    data, training = config.data, config.training
    generators = Generators.seeded(training.seed, device)
    fmt = torch.channels_last if training.channels_last else torch.preserve_format
    sync_batchnorm = training.sync_batchnorm
    if sync_batchnorm is None:
        sync_batchnorm = ranks.world_size > 1 and device.type == "cuda"
    partly_frozen = bool(config.model.freeze_epochs)
    model, parallel = data_parallel(model.to(device, memory_format=fmt), device, sync_batchnorm, partly_frozen)
    forward = torch.compile(model) if training.compile else model
    train_forward = forward
    if parallel is not model:  # a distributed run: DDP averages the gradients over the ranks
        train_forward = torch.compile(parallel) if training.compile else parallel
    # Every rank draws the same permutation and augments the whole global batch (the same random
    # streams everywhere, so rank 0's checkpoint resumes them all), then trains on its slice.
    train_loader = make_loader(
        train,
        data.batch_size,
        device,
        shuffle=data.shuffle,
        drop_last=data.drop_last,
        generators=generators,
        multiple_of=ranks.world_size,
    )
    augment = generators.augment if data.augment else None
    train_batches = Batches(
        train_loader,
        device,
        BatchTransform(
            data.mean,
            data.std,
            device,
            augment,
            training.channels_last,
            data.crop_padding,
            data.image_size,
            data.train_crop,
        ),
        shard=(ranks.rank, ranks.world_size),
    )
    optimizer = build_optimizer(model, config.optim)
    return _Run(
        model=model,
        forward=forward,
        train_forward=train_forward,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config.optim, training.epochs, len(train_batches)),
        criterion=nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing),
        generators=generators,
        train_batches=train_batches,
        eval_batches=eval_batches(
            eval_split, data.mean, data.std, device, data.batch_size, training.channels_last, data.image_size
        ),
    )


def _resume(
    run: _Run, path: Path, config: PipelineConfig, device: torch.device, ranks: Ranks
) -> tuple[_FitState, bool]:
    """Restore `run` from a training checkpoint; returns its state and whether that run had finished."""
    stored = TrainingCheckpoint.from_dict(checkpoints.load_checkpoint(path))
    _check_resumable(stored, config, path, device, ranks.world_size)
    checkpoints.apply_state_dict(run.model, stored.model, path)
    if _is_finished(stored, config.training.epochs):
        return _FitState.from_checkpoint(stored), True
    try:
        run.optimizer.load_state_dict(stored.optimizer)
        run.scheduler.load_state_dict(stored.scheduler)
    except (ValueError, KeyError) as err:
        raise CheckpointError(
            f"Checkpoint '{path}' has optimizer/scheduler state that does not fit this run: {err}"
        ) from None
    restore_rng_state(stored.rng, run.generators)
    return _FitState.from_checkpoint(stored), False


def freeze_backbone(model: nn.Module, frozen: bool) -> list[nn.Module]:
    """Head-only training (model.freeze_epochs): every parameter outside the classifier head
    (`models.head_name`) stops (`frozen`) or resumes taking gradients. Returns the leaf modules
    outside the head, to keep in eval mode while frozen: their BatchNorm statistics stay too, so the
    frozen backbone is bit-identical afterwards (timm's `freeze`; Lightning's BaseFinetuning keeps
    training BatchNorm unless train_bn=False); [] when not frozen."""
    head = head_name(model)
    for name, parameter in model.named_parameters():
        if not is_head(name, head):
            parameter.requires_grad_(not frozen)
    if not frozen:
        return []
    return [module for name, module in model.named_modules() if not list(module.children()) and not is_head(name, head)]


def _run_epoch(
    run: _Run,
    state: _FitState,
    epoch: int,
    config: PipelineConfig,
    device: torch.device,
    callbacks: Sequence[Callback],
    progress: Progress | None,
    stop: StopGuard,
    ranks: Ranks,
    timer: PhaseTimer,
) -> EpochMetrics:
    """Train and evaluate one epoch, and fold its figures into `state`."""
    precision = config.training.precision
    frozen = freeze_backbone(run.model, epoch <= config.model.freeze_epochs) if config.model.freeze_epochs else []
    start = time.perf_counter()
    stats = train_one_epoch(
        run.train_forward,
        run.criterion,
        run.optimizer,
        run.scheduler,
        run.train_batches,
        device,
        precision=precision,
        grad_clip=config.optim.grad_clip,
        epoch=epoch,
        step=state.step,
        callbacks=callbacks,
        progress=progress,
        stop=stop,
        timer=timer,
        frozen=frozen,
    )
    # Rank 0 evaluates (its weights and BN statistics are what the checkpoint holds, so the figures
    # are a single-process evaluation's) and every rank takes its figures: the decisions below
    # (divergence, best, early stop) come out the same on every rank. The others wait meanwhile.
    eval_loss, eval_accuracy = math.nan, math.nan
    if ranks.is_main:
        logits, labels = collect_logits(run.forward, run.eval_batches, device, precision, stop, config.data.test_flip)
        eval_loss, eval_accuracy = loss_and_accuracy(logits, labels)
    eval_loss, eval_accuracy = from_main([eval_loss, eval_accuracy], device)
    timer.lap("evaluation")  # the other ranks: waiting for rank 0's
    if not (math.isfinite(stats.loss) and math.isfinite(eval_loss)):
        raise ConfigError(
            f"Training diverged in epoch {epoch} (train loss {stats.loss:.4g}, eval loss {eval_loss:.4g}) "
            f"with optim.lr {config.optim.lr}: lower optim.lr or set optim.grad_clip"
        )
    metrics = EpochMetrics(
        epoch=epoch,
        step=stats.step,
        train_loss=stats.loss,
        train_accuracy=stats.accuracy,
        eval_loss=eval_loss,
        eval_accuracy=eval_accuracy,
        lr=run.optimizer.param_groups[0]["lr"],
        images_per_second=stats.images / stats.seconds,
        seconds=time.perf_counter() - start,
    )
    state.record(metrics, stats, config.training.monitor, config.training.early_stopping_patience)
    return metrics


def _save_checkpoints(
    checkpoint_dir: Path | None, state: _FitState, run: _Run, config: PipelineConfig, spec: ModelSpec, ranks: Ranks
) -> None:
    """last.pt every epoch; best.pt too when this epoch improved the monitored metric. Rank 0 writes
    them (the unwrapped module's state dict); the other ranks wait for it."""
    if checkpoint_dir is None or not ranks.is_main:
        wait_for_main()
        return
    saved = _checkpoint(
        state, run.model, run.optimizer, run.scheduler, run.generators, config, spec, ranks.world_size
    ).to_dict()
    # best.pt first: a crash between the two writes leaves last.pt one epoch behind, and resuming
    # retrains that epoch (bit-identical on CPU) instead of leaving an epoch's best unsaved.
    if state.improved:
        checkpoints.save_checkpoint(checkpoint_dir / BEST_CHECKPOINT, saved)
    checkpoints.save_checkpoint(checkpoint_dir / LAST_CHECKPOINT, saved)
    wait_for_main()


def _start_info(
    run: _Run,
    state: _FitState,
    config: PipelineConfig,
    spec: ModelSpec,
    device: torch.device,
    train: Any,
    eval_split: Any,
) -> FitStart:
    return FitStart(
        epoch=state.epoch,
        step=state.step,
        epochs=config.training.epochs,
        steps_per_epoch=len(run.train_batches),
        train_images=len(train.labels),
        eval_images=len(eval_split.labels),
        device=str(device),
        config=config.model_dump(mode="json"),
        spec=spec.to_dict(),
        history=list(state.history),
    )


def _train_epochs(
    run: _Run,
    state: _FitState,
    config: PipelineConfig,
    spec: ModelSpec,
    device: torch.device,
    checkpoint_dir: Path | None,
    callbacks: Sequence[Callback],
    progress: Progress | None,
    ranks: Ranks,
) -> tuple[dict[str, float], int]:
    """Train the epochs after `state.epoch`, each checkpointed and reported; returns the seconds per
    phase (EPOCH_PHASES) and the number of epochs trained."""
    timeout = config.training.timeout_minutes
    # Ctrl-C and the timeout stop training at a batch boundary: last.pt stays the last finished
    # epoch's, and rerunning resumes from it.
    timer, epochs_run = PhaseTimer(device), 0
    with StopGuard(timeout * 60 if timeout is not None else None) as stop:
        for epoch in range(state.epoch + 1, config.training.epochs + 1):
            metrics = _run_epoch(run, state, epoch, config, device, callbacks, progress, stop, ranks, timer)
            _save_checkpoints(checkpoint_dir, state, run, config, spec, ranks)
            timer.lap("checkpoint")
            if progress is not None:
                progress.epoch_end(metrics)
            for cb in callbacks:
                cb.on_epoch_end(metrics)
            timer.lap("callbacks")
            epochs_run += 1
            if state.stopped_early:
                break
    return timer.totals(), epochs_run


def fit(
    model: nn.Module,
    train: Any,
    eval_split: Any,
    config: PipelineConfig,
    spec: ModelSpec,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    callbacks: Sequence[Callback] = (),
    *,
    progress_stream: TextIO | None = None,
) -> FitResult:
    """Train `model` in place on decoded splits (`.images` uint8 (N, 3, H, W), `.labels` (N,)) or
    on `cache.FileSplit`s, streamed from their files (the same batches; FitResult.loader says which).

    Writes checkpoint_dir/last.pt every epoch and best.pt when config.training.monitor improves.
    Ctrl-C stops it at the next batch boundary (see StopGuard), and so does
    config.training.timeout_minutes (TrainingTimedOut).
    `resume_from` continues a run at its next epoch (checkpoints go beside it unless
    `checkpoint_dir` says otherwise); a finished run returns its stored result at once.
    `progress_stream` receives the progress bar / epoch lines (default stderr).
    In a torch.distributed process group every rank calls `fit` alike; rank 0 alone writes
    checkpoints and progress, callbacks run where they are given.
    """
    ranks = Ranks.current()
    loader = "stream" if isinstance(train, FileSplit) else "memory"
    config = _with_normalization(config.resolved(), train)
    spec = replace(spec, mean=config.data.mean, std=config.data.std, test_flip=config.data.test_flip)
    _check_data(train, eval_split, spec, config, ranks)
    device = resolve_device(config.training.device)
    config = with_fast_settings(config, spec, device)
    if config.model.whiten and resume_from is None:  # a resumed run's weights come from its checkpoint
        images = sample_images(train, whiten_images(spec.input_size))  # 512 at 32 px, 16 at 224 px
        whiten_first_conv(model, images, config.data.mean, config.data.std)
    run = _build_run(model, train, eval_split, config, device, ranks)
    state, finished = _FitState(), False
    if resume_from is not None:
        resume_from = Path(resume_from)
        checkpoint_dir = checkpoint_dir or resume_from.parent
        state, finished = _resume(run, resume_from, config, device, ranks)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if finished:
        return _result(state, run.model, checkpoint_dir, device, spec, config, loader)
    for cb in callbacks:
        cb.on_fit_start(_start_info(run, state, config, spec, device, train, eval_split))
    progress = Progress(config.training.epochs, progress_stream) if ranks.is_main else None
    phase_seconds, epochs_run = _train_epochs(
        run, state, config, spec, device, checkpoint_dir, callbacks, progress, ranks
    )
    result = _result(state, run.model, checkpoint_dir, device, spec, config, loader, phase_seconds, epochs_run)
    for cb in callbacks:
        cb.on_fit_end(result)
    return result
