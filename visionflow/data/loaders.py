"""Batches of a split, from one of two sources: the whole decoded split moved to the training
device once (`DeviceLoader`, data.loader memory), or its files decoded and resized batch by batch
by DataLoader worker processes (`StreamLoader`, data.loader stream). Both take each epoch's
order from the same `BatchOrder` (one fresh seeded permutation), so they yield the same uint8
batches; `Batches` then augments and normalizes them batch-wise on the device.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from visionflow.config import DataConfig
from visionflow.data.decoded import FileSplit, decode_file
from visionflow.data.transforms import BatchTransform, mean_std
from visionflow.train.rng import Generators


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy to `device`; through pinned memory with an async copy when it is a CUDA device."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class BatchOrder:
    """The indices of each batch of a pass over `n` images (a DataLoader `batch_sampler`).

    Each pass draws one fresh permutation from `generator` (when shuffling). Batch sizes are
    multiples of `multiple_of` (the world size of a distributed run, so that every rank gets an
    equal slice): a last batch that is not loses its remainder, one smaller than it is dropped.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        multiple_of: int = 1,
    ):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.generator, self.multiple_of = generator, multiple_of

    def __len__(self) -> int:
        last = self.n % self.batch_size  # images of the last, incomplete batch
        return self.n // self.batch_size + (0 if self.drop_last or last < self.multiple_of else 1)

    def batches(self) -> Iterator[Tensor]:
        """One pass: each batch's indices, (B,) int64 slices of the pass's permutation (on the CPU)."""
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            size = min(self.batch_size, self.n - start)
            yield order[start : start + size - size % self.multiple_of]

    def __iter__(self) -> Iterator[list[int]]:
        return (batch.tolist() for batch in self.batches())


class DeviceLoader:
    """A whole split resident on one device, sliced into (uint8 images, labels) batches in `order`."""

    def __init__(self, images: Tensor, labels: Tensor, order: BatchOrder):
        self.images, self.labels, self.order = images, labels, order  # (N, 3, H, W) uint8, (N,) int64

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.order.batches():
            # (B,): on CUDA a pinned async copy; torch.tensor(list, device=cuda) would be a
            # pageable copy, which waits for the GPU to finish the queued steps (a sync point per batch).
            index = _to_device(batch, self.labels.device)
            yield self.images[index], self.labels[index]


class _DecodedFiles(Dataset):
    """(uint8 (3, S, S) image, label) of file i, decoded by `cache.decode_file` (in a worker)."""

    def __init__(self, split: FileSplit):
        self.paths, self.labels, self.image_size = split.paths, split.labels.tolist(), split.image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = np.ascontiguousarray(decode_file(self.paths[index], self.image_size))  # a writable copy
        return torch.from_numpy(image), self.labels[index]


class StreamLoader:
    """A split decoded batch by batch from its files by `split.num_workers` DataLoader processes
    (persistent across epochs; 0 = in this process), (uint8 images, labels) batches in `order`;
    pinned for an async copy when training on CUDA. Nothing decoded outlives its batch."""

    def __init__(self, split: FileSplit, order: BatchOrder, device: torch.device):
        self.order = order
        self.loader: DataLoader[Any] = DataLoader(
            _DecodedFiles(split),
            batch_sampler=order,  # iterated here, in the training process: the run's generator
            num_workers=split.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=split.num_workers > 0,
        )

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.loader)


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
    split: Any,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    generators: Generators | None = None,
    multiple_of: int = 1,
) -> DeviceLoader | StreamLoader:
    """(uint8 images, labels) batches of a split: a `cache.FileSplit` streamed from its files, or a
    decoded split (`.images` uint8 (N, 3, H, W), `.labels` (N,)) resident on `device`; shuffled with
    `generators.shuffle` (required when `shuffle`); batch sizes multiples of `multiple_of`."""
    if shuffle and generators is None:
        raise ValueError("make_loader(shuffle=True) needs the run's generators for a reproducible order")
    shuffle_gen = generators.shuffle if generators is not None else None
    order = BatchOrder(len(split.labels), batch_size, shuffle, drop_last, shuffle_gen, multiple_of)
    if isinstance(split, FileSplit):
        return StreamLoader(split, order, device)
    return DeviceLoader(_to_device(split.images, device), _to_device(split.labels, device), order)


def sample_images(split: Any, count: int) -> Tensor:
    """Up to `count` uint8 (3, H, W) images spread evenly over the split (which is sorted by
    class), stacked on the CPU; a streamed split decodes only those files."""
    index = torch.linspace(0, len(split.labels) - 1, min(count, len(split.labels))).long().tolist()
    if isinstance(split, FileSplit):
        return torch.from_numpy(np.stack([decode_file(split.paths[i], split.image_size) for i in index]))
    return split.images[index]


def uint8_batches(split: Any, batch_size: int = 256) -> Iterator[Tensor]:
    """The split's uint8 (B, 3, H, W) images in order, on the CPU (for statistics such as `mean_std`)."""
    for images, _ in make_loader(split, batch_size, torch.device("cpu")):
        yield images


def with_train_statistics(data: DataConfig, train: Any) -> DataConfig:
    """`data` with data.mean and data.std, each one left empty, filled from the train split's pixels
    (`transforms.mean_std`); the split is read only when one is empty."""
    if data.mean is not None and data.std is not None:
        return data
    mean, std = mean_std(uint8_batches(train))
    return data.model_copy(update={"mean": data.mean or mean, "std": data.std or std})


def eval_batches(
    split: Any,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int = 256,
    channels_last: bool = False,
    size: int | None = None,
) -> Batches:
    """Normalized float batches of a split (see `make_loader`) in order, center-cropped to `size`
    (default: none), for `collect_logits`."""
    transform = BatchTransform(mean, std, device, channels_last=channels_last, size=size)
    return Batches(make_loader(split, batch_size, device), device, transform)
