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

    Each pass draws one fresh permutation from `generator` (when shuffling). Batch sizes are
    multiples of `multiple_of` (the world size of a distributed run, so that every rank gets an
    equal slice): a last batch that is not loses its remainder, one smaller than it is dropped.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        multiple_of: int = 1,
    ):
        self.images, self.labels = images, labels  # (N, 3, H, W) uint8, (N,) int64, same device
        self.batch_size, self.shuffle, self.drop_last, self.generator = batch_size, shuffle, drop_last, generator
        self.multiple_of = multiple_of

    def __len__(self) -> int:
        n = len(self.labels)
        last = n % self.batch_size  # images of the last, incomplete batch
        return n // self.batch_size + (0 if self.drop_last or last < self.multiple_of else 1)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator).to(self.labels.device) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            size = min(self.batch_size, n - start)
            end = start + size - size % self.multiple_of
            if order is None:
                yield self.images[start:end], self.labels[start:end]
            else:
                index = order[start:end]  # (B,)
                yield self.images[index], self.labels[index]


class Batches:
    """Model-ready batches: (uint8 images, labels) from `source`, moved to `device`, then `transform`ed."""

    def __init__(
        self,
        source: Iterable[tuple[Tensor, Tensor]],
        device: torch.device,
        transform: Callable[[Tensor], Tensor],
        shard: tuple[int, int] = (0, 1),
    ):
        self.source, self.device, self.transform = source, device, transform
        # (rank, world size): each batch is transformed whole (the same random draws on every
        # rank), then rank r keeps the r-th of world-size equal slices.
        self.rank, self.world_size = shard

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.source:
            images = images.to(self.device, non_blocking=True)  # no-op for a DeviceLoader on `device`
            inputs, labels = self.transform(images), labels.to(self.device, non_blocking=True)
            if self.world_size > 1:
                size = len(labels) // self.world_size
                part = slice(self.rank * size, (self.rank + 1) * size)
                inputs, labels = inputs[part], labels[part]
            yield inputs, labels


def make_loader(
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    generators: Generators | None = None,
    multiple_of: int = 1,
) -> DeviceLoader:
    """(uint8 images, labels) batches of a decoded split, resident on `device`; shuffled with
    `generators.shuffle` (required when `shuffle`); batch sizes multiples of `multiple_of`."""
    if shuffle and generators is None:
        raise ValueError("make_loader(shuffle=True) needs the run's generators for a reproducible order")
    shuffle_gen = generators.shuffle if generators is not None else None
    return DeviceLoader(
        _to_device(images, device), _to_device(labels, device), batch_size, shuffle, drop_last, shuffle_gen, multiple_of
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
