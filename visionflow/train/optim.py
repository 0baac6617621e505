"""Optimizers and learning-rate schedules by name, from the resolved `OptimConfig`.

Schedules are stepped once per optimizer step (batch), including `step` (its step_size is in
epochs, converted to batches), so every schedule resumes exactly from its saved state.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler, OneCycleLR, StepLR

from visionflow.config import OptimConfig
from visionflow.errors import ConfigError
from visionflow.models import head_name, is_head


def _param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Decay weight matrices and kernels only: decaying biases and norm gains just hurts (nanoGPT).
    With optim.backbone_lr_scale below 1, everything but the classifier head (`models.head_name`)
    gets its own groups at lr x backbone_lr_scale (discriminative fine-tuning rates)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    parts = [(named, optim.lr)]
    if optim.backbone_lr_scale != 1:
        head = head_name(model)
        backbone = [(name, p) for name, p in named if not is_head(name, head)]
        parts = [
            (backbone, optim.lr * optim.backbone_lr_scale),
            ([np for np in named if is_head(np[0], head)], optim.lr),
        ]
    groups = []
    for params, lr in parts:
        groups.append({"params": [p for _, p in params if p.dim() >= 2], "weight_decay": optim.weight_decay, "lr": lr})
        groups.append({"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr})
    return [group for group in groups if group["params"]]


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], Optimizer]] = {
    "sgd": lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov),
    "adam": lambda groups, o: torch.optim.Adam(groups, lr=o.lr),
    "adamw": lambda groups, o: torch.optim.AdamW(groups, lr=o.lr),
}

# (optimizer, optim config, total steps, steps per epoch) -> a scheduler stepped once per batch.
SCHEDULERS: dict[str, Callable[[Optimizer, OptimConfig, int, int], LRScheduler]] = {
    "none": lambda opt, o, total, per_epoch: ConstantLR(opt, factor=1.0, total_iters=0),
    "step": lambda opt, o, total, per_epoch: StepLR(opt, step_size=o.step_size * per_epoch, gamma=o.gamma),
    "cosine": lambda opt, o, total, per_epoch: CosineAnnealingLR(opt, T_max=total),
    # Warm up over the first 25% of steps (more on tiny runs: _warmup_fraction), then anneal to
    # lr / 25e4, each parameter group from its own rate; momentum stays as configured.
    "onecycle": lambda opt, o, total, per_epoch: OneCycleLR(
        opt,
        max_lr=[group["lr"] for group in opt.param_groups],
        total_steps=total,
        pct_start=_warmup_fraction(total),
        cycle_momentum=False,
    ),
}


def _choose(kind: str, name: str | None, registry: dict) -> Callable:
    if name not in registry:
        raise ConfigError(f"Invalid {kind} '{name}'. Choose from: {', '.join(sorted(registry))}")
    return registry[name]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> Optimizer:
    """The optimizer named by `optim.optimizer` (resolved config), weight decay on >= 2-D params."""
    build = _choose("optimizer", optim.optimizer, OPTIMIZERS)
    if optim.optimizer == "sgd" and optim.nesterov and not optim.momentum:
        raise ConfigError(
            f"Invalid config field 'optim.nesterov': Nesterov needs optim.momentum > 0 (got {optim.momentum})"
        )
    return build(_param_groups(model, optim), optim)


def _warmup_fraction(total_steps: int) -> float:
    """25% warm-up, stretched on tiny runs: OneCycleLR divides by (pct_start * total - 1), which
    is zero at 4 total steps, so the warm-up must span more than one step (and stay under 100%)."""
    return min(0.9, max(0.25, 1.5 / total_steps))


def build_scheduler(optimizer: Optimizer, optim: OptimConfig, epochs: int, steps_per_epoch: int) -> LRScheduler:
    """The schedule named by `optim.scheduler`, stepped once per batch over `epochs` epochs."""
    return _choose("scheduler", optim.scheduler, SCHEDULERS)(
        optimizer, optim, epochs * steps_per_epoch, steps_per_epoch
    )
