"""Batches of a decoded split. The fast path: the whole split moved to the training device once,
each epoch sliced into (uint8 images, labels) batches in a fresh seeded order, then augmented and
normalized batch-wise on the device. A custom `sampler` or `collate_fn` gets a torch DataLoader
over a TensorDataset instead (the tutorial's knobs); with the default collate it yields the very
same batches."""

from __future__ import annotations

import random
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, SequentialSampler, TensorDataset

from visionflow.rng import Generators
from visionflow.transforms import BatchTransform


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: Python and NumPy follow the worker's torch seed (base seed + id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy to `device`; through pinned memory with an async copy when it is a CUDA device."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceLoader:
    """The fast path: a whole split resident on one device, sliced into (uint8 images, labels) batches.

    Each pass draws one fresh permutation from `generator` (when shuffling), like
    PermutationSampler, so a DataLoader over the same data yields the same batches.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None):
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
                yield self.images[start:start + self.batch_size], self.labels[start:start + self.batch_size]
            else:
                index = order[start:start + self.batch_size]  # (B,)
                yield self.images[index], self.labels[index]


class PermutationSampler(Sampler[int]):
    """One fresh permutation of range(n) per pass, drawn like DeviceLoader's. (RandomSampler draws
    an extra, unused permutation at the end of every pass, which would desynchronize the paths.)"""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


class Batches:
    """Model-ready batches: (uint8 images, labels) from `source`, moved to `device`, then `transform`ed."""

    def __init__(self, source: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                 transform: Callable[[Tensor], Tensor]):
        self.source, self.device, self.transform = source, device, transform

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.source:
            images = images.to(self.device, non_blocking=True)  # no-op on the fast path
            yield self.transform(images), labels.to(self.device, non_blocking=True)


def make_loader(images: Tensor, labels: Tensor, batch_size: int, device: torch.device, *,
                shuffle: bool = False, drop_last: bool = False, generators: Generators | None = None,
                num_workers: int = 0, sampler: Sampler | None = None,
                collate_fn: Callable | None = None) -> Iterable[tuple[Tensor, Tensor]]:
    """(uint8 images, labels) batches of a decoded split: the on-device fast path by default.

    A `sampler` or `collate_fn` gets a torch DataLoader over a TensorDataset instead, honouring
    batch_size, shuffle (ignored when a sampler is given), num_workers and drop_last, with worker
    seeds drawn from `generators.workers`. `collate_fn` must return (uint8 (B, 3, H, W), (B,) labels).
    """
    if shuffle and generators is None:
        raise ValueError("make_loader(shuffle=True) needs the run's generators for a reproducible order")
    shuffle_gen = generators.shuffle if generators is not None else None
    if sampler is None and collate_fn is None:
        return DeviceLoader(_to_device(images, device), _to_device(labels, device), batch_size,
                            shuffle, drop_last, shuffle_gen)
    dataset = TensorDataset(images, labels)
    if sampler is None:
        sampler = PermutationSampler(len(dataset), shuffle_gen) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, collate_fn=collate_fn, worker_init_fn=_seed_worker,
                      generator=generators.workers if generators is not None else None,
                      pin_memory=device.type == "cuda")


def eval_batches(images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, batch_size: int = 256, channels_last: bool = False) -> Batches:
    """Normalized float batches of a decoded split in order, for `evaluate` and `collect_logits`."""
    loader = make_loader(images, labels, batch_size, device)
    return Batches(loader, device, BatchTransform(mean, std, device, channels_last=channels_last))
