"""Decoded-tensor cache: a split decoded once into a uint8 (N, 3, S, S) tensor, stored under
`cache_dir` keyed by the split fingerprint and the size, so epochs and later runs skip JPEG/PNG
decoding entirely. 50,000 32x32 images take 150 MB (one byte per channel value), 100,000 photos at
224 px 15 GB: such a split is streamed instead (`FileSplit`, data.loader), decoded batch by batch by
the same `decode_file`, so both loaders see the same pixels.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from visionflow.config import DataConfig, decode_size
from visionflow.cores import usable_cores
from visionflow.data.fingerprint import fingerprint_split
from visionflow.data.images import load_rgb, thread_map
from visionflow.data.splits import Split, decoded_cache_dir
from visionflow.fileio import atomic_write

log = logging.getLogger(__name__)

# Bump when the stored layout or the decoding (resize filter, conversion) changes, so that old
# files are simply never looked up again.
_FORMAT = 1


@dataclass
class DecodedSplit:
    """A decoded split, ready to batch on any device."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    fingerprint: str
    files: tuple[str, ...]  # relative paths, same order (for reports)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


@dataclass
class FileSplit:
    """A split read from its files batch by batch (the stream loader): nothing decoded is kept."""

    paths: tuple[Path, ...]  # absolute, in split order
    labels: torch.Tensor  # (N,) int64
    classes: tuple[str, ...]
    files: tuple[str, ...]  # relative paths, same order (for reports)
    image_size: int
    num_workers: int  # DataLoader worker processes decoding it; 0 = in the reading process

    def __len__(self) -> int:
        return len(self.labels)


def memory_budget_mb(data: DataConfig) -> float:
    """data.memory_budget_mb, or a quarter of this machine's physical RAM when it is None."""
    if data.memory_budget_mb is not None:
        return data.memory_budget_mb
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (4 * 2**20)


def choose_loader(data: DataConfig, *splits: Split) -> str:
    """'memory' or 'stream': data.loader, with 'auto' meaning memory while `splits` (a run's train
    and eval splits, or the one split an evaluation reads) decoded at data.image_size (3 bytes per
    pixel) fit `memory_budget_mb`."""
    if data.loader != "auto":
        return data.loader
    decoded_mb = sum(len(split) for split in splits) * 3 * decode_size(data.image_size, data.crop_pct) ** 2 / 2**20
    return "memory" if decoded_mb <= memory_budget_mb(data) else "stream"


def default_num_workers() -> int:
    """Stream loader workers when data.num_workers is None: the usable cores, at most 8."""
    return min(8, usable_cores())


def open_split(split: Split, data: DataConfig, loader: str) -> DecodedSplit | FileSplit:
    """The split as `loader` ('memory' or 'stream', see `choose_loader`) reads it: decoded into RAM
    through the cache, or its files, decoded batch by batch by data.num_workers processes."""
    size = decode_size(data.image_size, data.crop_pct)
    if loader == "memory":
        return load_decoded(split, size, decoded_cache_dir(data.data_dir))
    if loader != "stream":
        raise ValueError(f"Invalid loader '{loader}'. Choose from: memory, stream")
    workers = data.num_workers if data.num_workers is not None else default_num_workers()
    files = tuple(split.relpath(i) for i in range(len(split)))
    labels = torch.tensor(split.labels, dtype=torch.int64)
    return FileSplit(tuple(split.files), labels, split.classes, files, size, workers)


def open_eval_split(split: Split, data: DataConfig, image_size: int) -> DecodedSplit | FileSplit:
    """`split` decoded at `image_size` (a model spec's decode_size), read by data.loader (auto: memory
    while this one split, decoded, fits the budget; a champion or a CLI evaluation streams what would not fit)."""
    data = data.model_copy(update={"image_size": image_size, "crop_pct": 1.0})
    return open_split(split, data, choose_loader(data, split))


def cache_path(fingerprint: str, image_size: int, cache_dir: Path | str) -> Path:
    """Where the decoded tensors of a split fingerprint at image_size live."""
    return Path(cache_dir) / f"decoded-v{_FORMAT}-{fingerprint}-{image_size}.pt"


def _checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    # torch.load validates structure, not content: a flipped byte inside the tensor data would
    # load silently. This sha256 turns such corruption into a cache miss.
    h = hashlib.sha256(images.numpy().data)
    h.update(labels.numpy().data)
    return h.hexdigest()


def decode_file(path: Path | str, image_size: int) -> np.ndarray:
    """One image file as uint8 (3, S, S): decoded to RGB (`images.load_rgb`), resized to
    image_size x image_size (bilinear with antialiasing, like torchvision's Resize on PIL images).

    Pillow for both loaders, measured against torchvision.io on hymenoptera JPEGs (~500x375 to
    224 px, one core): decode_image decodes the same pixels ~1.3 ms faster (of ~4.5 ms), but its
    antialiased resize differs from Pillow's by up to 1 level and it has no load_rgb rules
    (alpha on white, 16-bit scaling); memory and stream loaders must see identical pixels.
    """
    image = load_rgb(path)
    if image.size != (image_size, image_size):
        # Pillow's resize widens the filter support when shrinking, i.e. it antialiases.
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


def decode_split(split: Split, image_size: int, fingerprint: str) -> DecodedSplit:
    """Decode every file of split (`decode_file`) into one preallocated uint8 tensor."""
    images = torch.empty((len(split), 3, image_size, image_size), dtype=torch.uint8)
    target = images.numpy()  # shares memory; rows are written in place by the worker threads

    def decode(index: int) -> None:
        target[index] = decode_file(split.files[index], image_size)

    thread_map(decode, range(len(split)))
    labels = torch.tensor(split.labels, dtype=torch.int64)
    files = tuple(split.relpath(i) for i in range(len(split)))
    return DecodedSplit(images, labels, split.classes, fingerprint, files)


def _read(path: Path, split: Split, image_size: int, fingerprint: str) -> DecodedSplit | None:
    """The cached DecodedSplit, or None when the file is missing, unreadable or inconsistent."""
    try:
        stored: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = stored["images"], stored["labels"]
        expected_shape = (len(split), 3, image_size, image_size)
        consistent = (
            stored["fingerprint"] == fingerprint
            and tuple(images.shape) == expected_shape
            and images.dtype == torch.uint8
            and tuple(labels.shape) == (len(split),)
            and labels.dtype == torch.int64
            and tuple(stored["classes"]) == split.classes
            and len(stored["files"]) == len(split)
            and stored["checksum"] == _checksum(images, labels)
        )
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - any unreadable cache file is a miss, never an error
        log.warning("ignoring unreadable cache file %s (%s: %s)", path, type(err).__name__, err)
        return None
    if not consistent:
        log.warning("ignoring inconsistent cache file %s", path)
        return None
    return DecodedSplit(images, labels, tuple(stored["classes"]), fingerprint, tuple(stored["files"]))


def _write(path: Path, decoded: DecodedSplit) -> None:
    """Atomic write (fileio.atomic_write: a unique temp file, so concurrent writers of the
    same key never share one); readers see the old file or the complete new one."""
    payload = {
        "format": _FORMAT,
        "fingerprint": decoded.fingerprint,
        "images": decoded.images,
        "labels": decoded.labels,
        "classes": list(decoded.classes),
        "files": list(decoded.files),
        "checksum": _checksum(decoded.images, decoded.labels),
    }
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_decoded(split: Split, image_size: int, cache_dir: Path | str) -> DecodedSplit:
    """The split decoded at image_size, from the cache when present and intact, else decoded now
    and stored. A cache that cannot be written (read-only disk, full disk) costs a warning only."""
    if image_size < 1:
        raise ValueError(f"Invalid image_size {image_size}: expected a positive number of pixels")
    fingerprint = fingerprint_split(split)
    path = cache_path(fingerprint, image_size, cache_dir)
    cached = _read(path, split, image_size, fingerprint)
    if cached is not None:
        return cached
    decoded = decode_split(split, image_size, fingerprint)
    try:
        _write(path, decoded)
    except OSError as err:
        log.warning("could not write decoded cache %s: %s", path, err)
    return decoded
