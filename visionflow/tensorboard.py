"""TensorBoard logging for one training run: an engine callback for the training curves, and
functions for the transform preview, the model graph, the confusion matrix and per-class
precision-recall curves (hyperparameters with final metrics: `visionflow.hparams`, without torch).

Decisions:
- One folder per run (``runs.RunLayout.tensorboard``: ``<output_dir>/runs/<run_name>/tensorboard``),
  as the tutorial advises: two trainings in one folder draw on top of each other. Pointing
  TensorBoard at the parent (``tensorboard --logdir <output_dir>/runs``) compares runs.
- Every function opens its own short-lived writer on the run folder: the flow calls them from
  different tasks (maybe processes), and each writer adds its own uniquely named event file,
  which TensorBoard merges.
- Every scalar uses the global optimizer step as x-axis, so step and epoch curves overlay in one
  chart, and a resumed run can hide the crashed run's tail with one ``purge_step``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from visionflow.reports import render_confusion_matrix
from visionflow.train.records import Callback, EpochMetrics, FitResult, FitStart


class TensorBoardCallback(Callback):
    """Engine callback: the training loss (of that step's batch) and the learning rate every
    ``every_n_steps`` optimizer steps; per epoch the train/eval loss and accuracy, throughput
    and the epoch number. The event file is flushed every epoch, so a crash loses at most the
    current epoch. Hyperparameters are logged once, after evaluation, by ``hparams.log_hparams``."""

    def __init__(self, log_dir: Path | str, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"Invalid every_n_steps {every_n_steps}: expected an integer >= 1")
        self.log_dir = Path(log_dir)
        # Read by the engine: it only calls on_step_end (one device sync each) every N steps.
        self.every_n_steps = every_n_steps
        self.writer: SummaryWriter | None = None

    def on_fit_start(self, state: FitStart) -> None:
        # On resume, TensorBoard hides what the crashed session logged after its last checkpoint
        # (steps > state.step), so the curves continue instead of forking.
        purge_step = state.step + 1 if state.step else None
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def on_step_end(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("loss/train_step", loss, step)
        self.writer.add_scalar("lr", lr, step)

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        step = metrics.step
        self.writer.add_scalar("loss/train", metrics.train_loss, step)
        self.writer.add_scalar("loss/eval", metrics.eval_loss, step)
        self.writer.add_scalar("accuracy/train", metrics.train_accuracy, step)
        self.writer.add_scalar("accuracy/eval", metrics.eval_accuracy, step)
        self.writer.add_scalar("throughput/images_per_second", metrics.images_per_second, step)
        self.writer.add_scalar("epoch", metrics.epoch, step)
        self.writer.flush()

    def on_fit_end(self, result: FitResult) -> None:
        self.writer.close()


def _as_hwc_uint8(image: Image.Image | torch.Tensor) -> np.ndarray:
    """A PIL image or a (3, H, W) uint8 tensor as an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"Invalid image tensor {tuple(image.shape)} {image.dtype}: expected (3, H, W) uint8")
    return image.permute(1, 2, 0).cpu().numpy()


def log_image(log_dir: Path | str, tag: str, image: Image.Image | torch.Tensor, step: int = 0) -> None:
    """Log one RGB image (PIL, or a (3, H, W) uint8 tensor) under ``tag`` at ``step``."""
    with SummaryWriter(str(log_dir)) as writer:
        writer.add_image(tag, _as_hwc_uint8(image), step, dataformats="HWC")


def log_model_graph(log_dir: Path | str, model: nn.Module, input_size: int) -> None:
    """Trace ``model`` on a zero (1, 3, S, S) batch and log its graph (the GRAPHS tab)."""
    # torch.compile wraps the model; the tracer needs the plain module underneath.
    module = getattr(model, "_orig_mod", model)
    parameter = next(module.parameters())
    dummy = torch.zeros(1, 3, input_size, input_size, device=parameter.device, dtype=parameter.dtype)
    was_training = module.training
    # eval(): the trace must not update BatchNorm running statistics of a model being trained.
    module.eval()
    try:
        with SummaryWriter(str(log_dir)) as writer, warnings.catch_warnings():
            # add_graph can only trace with torch.jit, which warns it is deprecated on every call;
            # nothing a user can act on, so keep it out of the run's log.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=FutureWarning)
            writer.add_graph(module, dummy)
    finally:
        module.train(was_training)


def log_confusion_matrix(
    log_dir: Path | str,
    matrix: np.ndarray | torch.Tensor | Sequence[Sequence[int]],
    classes: Sequence[str],
    step: int = 0,
) -> Image.Image:
    """Render the (C, C) confusion matrix (rows = true class) and log it as ``eval/confusion_matrix``."""
    image = render_confusion_matrix(matrix, classes)
    log_image(log_dir, "eval/confusion_matrix", image, step)
    return image


def log_pr_curves(
    log_dir: Path | str,
    probabilities: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    classes: Sequence[str],
    step: int = 0,
) -> None:
    """One-vs-rest precision-recall curve per class (``pr/<class>``) from (N, C) softmax
    probabilities and (N,) integer labels."""
    probabilities = torch.as_tensor(probabilities, dtype=torch.float32).cpu()  # (N, C)
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()  # (N,)
    if probabilities.ndim != 2 or probabilities.shape != (labels.shape[0], len(classes)):
        raise ValueError(
            f"Invalid probabilities {tuple(probabilities.shape)} for {labels.shape[0]} labels and "
            f"{len(classes)} classes: expected (N, C) = ({labels.shape[0]}, {len(classes)})"
        )
    with SummaryWriter(str(log_dir)) as writer:
        for index, name in enumerate(classes):
            writer.add_pr_curve(f"pr/{name}", labels == index, probabilities[:, index], step)
