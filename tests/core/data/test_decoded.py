from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionflow.data.decoded import DecodedSplit, cache_path, load_decoded
from visionflow.data.fingerprint import fingerprint_split
from visionflow.data.images import load_rgb
from visionflow.data.splits import resolve_folder


@pytest.fixture
def train(cifar_subset):
    return resolve_folder(cifar_subset).train


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def test_decoded_split_contents(train, tmp_path):
    decoded = load_decoded(train, 32, tmp_path / "cache")
    assert isinstance(decoded, DecodedSplit)
    assert decoded.images.shape == (60, 3, 32, 32) and decoded.images.dtype == torch.uint8
    assert decoded.labels.dtype == torch.int64 and decoded.labels.tolist() == list(train.labels)
    assert decoded.classes == train.classes and decoded.fingerprint == fingerprint_split(train)
    assert decoded.files == tuple(train.relpath(i) for i in range(len(train))) and len(decoded) == 60
    expected = np.asarray(load_rgb(train.files[7])).transpose(2, 0, 1).copy()
    assert torch.equal(decoded.images[7], torch.from_numpy(expected))


def test_resize_is_antialiased_bilinear(train, tmp_path):
    decoded = load_decoded(train, 16, tmp_path / "cache")
    assert decoded.images.shape == (60, 3, 16, 16)
    expected = np.asarray(load_rgb(train.files[3]).resize((16, 16), Image.Resampling.BILINEAR))
    assert torch.equal(decoded.images[3], torch.from_numpy(expected.transpose(2, 0, 1).copy()))


def test_miss_then_hit(train, tmp_path):
    cache_dir = tmp_path / "cache"
    first = load_decoded(train, 32, cache_dir)
    path = cache_path(first.fingerprint, 32, cache_dir)
    assert cache_files(cache_dir) == [path.name]  # no temp file left behind
    stamp = path.stat().st_mtime_ns
    second = load_decoded(train, 32, cache_dir)
    assert path.stat().st_mtime_ns == stamp  # served from the file, not rewritten
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    assert second.files == first.files and second.classes == first.classes


def test_key_includes_size_and_content(train, tmp_path):
    cache_dir = tmp_path / "cache"
    load_decoded(train, 32, cache_dir)
    load_decoded(train, 8, cache_dir)
    load_decoded(train.without(train.files[:1]), 8, cache_dir)
    assert len(cache_files(cache_dir)) == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_byte", "empty"])
def test_corrupt_cache_file_is_a_miss(train, tmp_path, damage):
    cache_dir = tmp_path / "cache"
    good = load_decoded(train, 32, cache_dir)
    path = cache_path(good.fingerprint, 32, cache_dir)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a torch file at all")
    elif damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF  # inside the image tensor payload
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    again = load_decoded(train, 32, cache_dir)
    assert torch.equal(again.images, good.images)
    assert path.read_bytes() != bytes(data)  # recomputed and rewritten
    assert torch.equal(load_decoded(train, 32, cache_dir).images, good.images)


def test_concurrent_writers_of_one_key(train, tmp_path):
    cache_dir = tmp_path / "cache"
    results: list[DecodedSplit] = []
    threads = [threading.Thread(target=lambda: results.append(load_decoded(train, 24, cache_dir))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(torch.equal(r.images, results[0].images) for r in results)
    assert len(cache_files(cache_dir)) == 1
    assert torch.equal(load_decoded(train, 24, cache_dir).images, results[0].images)


def test_unwritable_cache_dir_still_decodes(train, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    decoded = load_decoded(train, 8, blocker / "cache")
    assert decoded.images.shape == (60, 3, 8, 8)


def test_memory_is_one_byte_per_value(train, tmp_path):
    decoded = load_decoded(train, 32, tmp_path / "cache")
    assert decoded.images.is_contiguous()
    assert decoded.images.untyped_storage().nbytes() == 60 * 3 * 32 * 32
