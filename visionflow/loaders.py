"""Batches of a decoded split: the whole split moved to the training device once, each epoch
sliced into (uint8 images, labels) batches in a fresh seeded order, then augmented and
normalized batch-wise on the device."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from visionflow.rng import Generators
from visionflow.transforms import BatchTransform


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy to `device`; through pinned memory with an async copy when it is a CUDA device."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceLoader:
    """A whole split resident on one device, sliced into (uint8 images, labels) batches.

    Each pass draws one fresh permutation from `generator` (when shuffling).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ):
        self.images, self.labels = images, labels  # (N, 3, H, W) uint8, (N,) int64, same device
        self.batch_size, self.shuffle, self.drop_last, self.generator = batch_size, shuffle, drop_last, generator

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator).to(self.labels.device) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:
                yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]
            else:
                index = order[start : start + self.batch_size]  # (B,)
                yield self.images[index], self.labels[index]


class Batches:
    """Model-ready batches: (uint8 images, labels) from `source`, moved to `device`, then `transform`ed."""

    def __init__(
        self, source: Iterable[tuple[Tensor, Tensor]], device: torch.device, transform: Callable[[Tensor], Tensor]
    ):
        self.source, self.device, self.transform = source, device, transform

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.source:
            images = images.to(self.device, non_blocking=True)  # no-op for a DeviceLoader on `device`
            yield self.transform(images), labels.to(self.device, non_blocking=True)


def make_loader(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    generators: Generators | None = None,
) -> DeviceLoader:
    """(uint8 images, labels) batches of a decoded split, resident on `device`; shuffled with
    `generators.shuffle` (required when `shuffle`)."""
    if shuffle and generators is None:
        raise ValueError("make_loader(shuffle=True) needs the run's generators for a reproducible order")
    shuffle_gen = generators.shuffle if generators is not None else None
    return DeviceLoader(
        _to_device(images, device), _to_device(labels, device), batch_size, shuffle, drop_last, shuffle_gen
    )


def eval_batches(
    images: Tensor,
    labels: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 256,
    channels_last: bool = False,
) -> Batches:
    """Normalized float batches of a decoded split in order, for `evaluate` and `collect_logits`."""
    loader = make_loader(images, labels, batch_size, device)
    return Batches(loader, device, BatchTransform(mean, std, device, channels_last=channels_last))
