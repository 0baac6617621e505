"""Model registry, the model spec that travels with exported weights, and a model summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from visionflow.errors import ConfigError


def build_tudui(num_classes: int) -> nn.Module:
    """The tutorial's CIFAR-10 network, layer for layer (no activations, as in the tutorial)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2),  # (B, 32, 32, 32)
        nn.MaxPool2d(2),  # (B, 32, 16, 16)
        nn.Conv2d(32, 32, 5, padding=2),  # (B, 32, 16, 16)
        nn.MaxPool2d(2),  # (B, 32, 8, 8)
        nn.Conv2d(32, 64, 5, padding=2),  # (B, 64, 8, 8)
        nn.MaxPool2d(2),  # (B, 64, 4, 4)
        nn.Flatten(),  # (B, 1024)
        nn.Linear(1024, 64),  # (B, 64)
        nn.Linear(64, num_classes),  # (B, num_classes)
    )


def build_resnet18(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 adapted for 32x32 images: a 3x3 stride-1 stem and no max-pool,
    so a 32x32 input still reaches the last stage at 4x4 instead of 1x1."""
    from torchvision.models import resnet18  # here: torchvision's import costs ~2 s (torch._dynamo)

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "tudui": build_tudui,
    "resnet18": build_resnet18,
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build a registered model; an unknown name raises ConfigError listing the valid ones."""
    if name not in MODELS:
        raise ConfigError(f"Invalid model '{name}'. Choose from: {', '.join(sorted(MODELS))}")
    if num_classes < 2:
        raise ConfigError(f"Invalid num_classes {num_classes}: a classifier needs at least 2 classes")
    return MODELS[name](num_classes)


@dataclass
class LayerSummary:
    name: str
    kind: str
    output_shape: list[int]
    num_parameters: int


@dataclass
class ModelSummary:
    num_parameters: int
    trainable_parameters: int
    input_shape: list[int]
    layers: list[LayerSummary]

    def to_text(self) -> str:
        rows = [f"{'layer':<24}{'type':<14}{'output shape':<22}{'params':>10}"]
        rows += [f"{r.name:<24}{r.kind:<14}{str(r.output_shape):<22}{r.num_parameters:>10,}" for r in self.layers]
        rows.append(f"total parameters: {self.num_parameters:,} (trainable {self.trainable_parameters:,})")
        return "\n".join(rows)


def summarize(model: nn.Module, input_size: int = 32) -> ModelSummary:
    """Parameter count and every leaf layer's output shape for one (1, 3, S, S) input."""
    layers: list[LayerSummary] = []

    def record(name: str):
        def hook(module: nn.Module, _inputs, output):
            layers.append(
                LayerSummary(
                    name,
                    type(module).__name__,
                    list(output.shape),
                    sum(p.numel() for p in module.parameters(recurse=False)),
                )
            )

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_hook(record(n)) for n, m in leaves]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return ModelSummary(
        num_parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        input_shape=[1, 3, input_size, input_size],
        layers=layers,
    )
