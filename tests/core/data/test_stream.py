"""The stream loader (data.loader stream): DataLoader workers decoding files give the memory
loader's batches, fit trains the same weights with either and resumes bit for bit, auto picks
stream over the memory budget, bad values are one-line errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import KillAfter, write_image
from visionflow import checkpoints
from visionflow.config import build_config
from visionflow.data.decoded import FileSplit, choose_loader, memory_budget_mb, open_split
from visionflow.data.loaders import StreamLoader, eval_batches, make_loader, sample_images
from visionflow.data.splits import DatasetInfo, resolve_folder
from visionflow.errors import ConfigError
from visionflow.models import build_model
from visionflow.steps import fill_normalization
from visionflow.train import engine
from visionflow.train.records import ModelSpec
from visionflow.train.rng import Generators, seed_everything

CPU = torch.device("cpu")
CLASSES = ("ants", "bees")


@pytest.fixture(scope="module")
def mixed_dataset(tmp_path_factory: pytest.TempPathFactory, hymenoptera: Path) -> DatasetInfo:
    """ants/bees: real hymenoptera JPEGs (hundreds of pixels, resized down) beside small images of
    every mode load_rgb converts (alpha, palette, grey, 16-bit), sizes below and above 32 px."""
    root = tmp_path_factory.mktemp("mixed")
    modes = ("RGB", "RGBA", "P", "L", "LA", "I;16", "RGB", "CMYK")
    for split, count in (("train", 10), ("val", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i, jpeg in enumerate(sorted((hymenoptera / split / name).iterdir())[:count]):
                shutil.copy(jpeg, root / split / name / jpeg.name)
                mode = modes[(i + label) % len(modes)]
                fmt = "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG"
                suffix = ".jpg" if fmt == "JPEG" else ".png"
                write_image(
                    root / split / name / f"small{i}{suffix}", mode, (20 + 7 * i, 50 - 3 * i), 10 * label + i, fmt
                )
    return resolve_folder(root)


def _data(tmp_path: Path, **fields):
    return build_config({"data": {"data_dir": str(tmp_path), "image_size": 32, **fields}}).data


def _all_batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_stream_yields_the_memory_batches_in_the_same_seeded_order(mixed_dataset: DatasetInfo, tmp_path: Path):
    data = _data(tmp_path, num_workers=2)
    memory, stream = (open_split(mixed_dataset.train, data, loader) for loader in ("memory", "stream"))
    assert isinstance(stream, FileSplit) and not hasattr(stream, "images") and stream.num_workers == 2
    loaders = []
    for split in (memory, stream):
        gens = Generators.seeded(3, CPU)
        loaders.append(make_loader(split, 8, CPU, shuffle=True, generators=gens, multiple_of=2))
    assert isinstance(loaders[1], StreamLoader) and len(loaders[0]) == len(loaders[1]) == 5  # 40 images
    for epoch in range(2):  # persistent workers, a fresh permutation each epoch
        expected, streamed = _all_batches(loaders[0]), _all_batches(loaders[1])
        assert [len(y) for _, y in streamed] == [8, 8, 8, 8, 8]
        for (a, y), (b, z) in zip(expected, streamed, strict=True):
            assert b.dtype == torch.uint8 and b.shape == (8, 3, 32, 32)
            assert torch.equal(a, b) and torch.equal(y, z)
        if epoch == 0:
            first = streamed
    assert not torch.equal(first[0][1], streamed[0][1])  # reshuffled
    in_order = [eval_batches(split, [0.5] * 3, [0.25] * 3, CPU, batch_size=6) for split in (memory, stream)]
    for (a, y), (b, z) in zip(*in_order, strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)


def test_normalization_from_the_stream_equals_memory(mixed_dataset: DatasetInfo, tmp_path: Path):
    memory = fill_normalization(mixed_dataset, _data(tmp_path, loader="memory"))
    stream = fill_normalization(mixed_dataset, _data(tmp_path / "other", loader="stream", num_workers=0))
    assert (memory.mean, memory.std) == (stream.mean, stream.std)
    assert not (tmp_path / "other").exists()  # the stream path writes no decoded cache


def _fit(dataset: DatasetInfo, tmp_path: Path, loader: str, checkpoint_dir=None, resume_from=None, callbacks=()):
    config = build_config(
        {
            "data": {"data_dir": str(tmp_path), "image_size": 32, "batch_size": 8, "loader": loader, "num_workers": 1},
            "training": {"epochs": 3, "device": "cpu", "precision": "fp32", "channels_last": False},
        }
    )
    train, evaluation = (open_split(split, config.data, loader) for split in (dataset.train, dataset.eval_split))
    spec = ModelSpec("tudui", len(CLASSES), 32, list(CLASSES))
    seed_everything(0)
    model = build_model("tudui", len(CLASSES))
    return engine.fit(
        model,
        train,
        evaluation,
        config,
        spec,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        callbacks=callbacks,
    )


@pytest.mark.slow
def test_fit_streams_the_memory_run_and_resumes_it_bit_for_bit(mixed_dataset: DatasetInfo, tmp_path: Path):
    memory = _fit(mixed_dataset, tmp_path / "cache", "memory")
    stream = _fit(mixed_dataset, tmp_path / "none", "stream")
    assert (memory.loader, stream.loader) == ("memory", "stream")
    assert stream.weights_sha256 == memory.weights_sha256
    assert [m.eval_loss for m in stream.history] == [m.eval_loss for m in memory.history]
    with pytest.raises(KeyboardInterrupt):
        _fit(mixed_dataset, tmp_path / "none", "stream", tmp_path / "crashed", callbacks=[KillAfter(1)])
    assert checkpoints.load_checkpoint(tmp_path / "crashed" / "last.pt")["epoch"] == 1
    resumed = _fit(mixed_dataset, tmp_path / "none", "stream", resume_from=tmp_path / "crashed" / "last.pt")
    assert resumed.weights_sha256 == memory.weights_sha256 and [m.epoch for m in resumed.history] == [1, 2, 3]
    assert not (tmp_path / "none").exists()  # streaming never built the decoded cache


def test_auto_streams_what_does_not_fit_the_budget(mixed_dataset: DatasetInfo, tmp_path: Path):
    # 56 train and eval images at 224 px decode to 8.04 MiB (3 bytes per pixel), at 32 px to 0.16 MiB.
    splits = (mixed_dataset.train, mixed_dataset.eval_split)
    assert sum(len(split) for split in splits) == 56
    assert choose_loader(_data(tmp_path, image_size=224, memory_budget_mb=8), *splits) == "stream"
    assert choose_loader(_data(tmp_path, image_size=224, memory_budget_mb=9), *splits) == "memory"
    assert choose_loader(_data(tmp_path, memory_budget_mb=1), *splits) == "memory"
    assert choose_loader(_data(tmp_path, loader="stream", memory_budget_mb=10**6), *splits) == "stream"
    assert choose_loader(_data(tmp_path, loader="memory", memory_budget_mb=1, image_size=224), *splits) == "memory"
    # An evaluation weighs the one split it reads: the eval split alone fits where both did not.
    eval_mb = len(mixed_dataset.eval_split) * 3 * 224**2 / 2**20
    assert eval_mb < 8 and choose_loader(_data(tmp_path, image_size=224, memory_budget_mb=8), splits[1]) == "memory"
    ram_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert memory_budget_mb(_data(tmp_path)) == pytest.approx(ram_kib / 1024 / 4, rel=0.01)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("loader", "fast", "Invalid config field 'data.loader': Input should be 'auto', 'memory' or 'stream'"),
        ("memory_budget_mb", 0, "Invalid config field 'data.memory_budget_mb'"),
        ("num_workers", -1, "Invalid config field 'data.num_workers'"),
    ],
)
def test_bad_loader_settings_are_one_line_errors(field: str, value: object, expected: str):
    with pytest.raises(ConfigError) as error:
        build_config({"data": {field: value}})
    assert str(error.value).startswith(expected) and repr(value) in str(error.value) and "\n" not in str(error.value)


def test_stream_workers_default_to_the_usable_cores(mixed_dataset: DatasetInfo, tmp_path: Path):
    split = open_split(mixed_dataset.train, _data(tmp_path), "stream")
    assert split.num_workers == min(8, len(os.sched_getaffinity(0)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stream_on_cuda_pins_its_batches_and_matches_memory(mixed_dataset: DatasetInfo, tmp_path: Path):
    cuda = torch.device("cuda")
    data = _data(tmp_path, num_workers=1)
    memory, stream = (open_split(mixed_dataset.train, data, loader) for loader in ("memory", "stream"))
    loaders = [
        make_loader(split, 8, cuda, shuffle=True, generators=Generators.seeded(3, cuda)) for split in (memory, stream)
    ]
    images, _ = next(iter(make_loader(stream, 8, cuda)))
    assert images.device.type == "cpu" and images.is_pinned()  # Batches copies it asynchronously
    for (a, y), (b, z) in zip(_all_batches(loaders[0]), _all_batches(loaders[1]), strict=True):
        assert a.device.type == "cuda" and torch.equal(a.cpu(), b) and torch.equal(y.cpu(), z)


def test_a_sample_of_a_streamed_split_is_the_memory_sample(mixed_dataset: DatasetInfo, tmp_path: Path):
    # What the whitened first layer is computed from (model.whiten): the same pixels either way.
    data = _data(tmp_path, num_workers=0)
    memory, stream = (open_split(mixed_dataset.train, data, loader) for loader in ("memory", "stream"))
    assert torch.equal(sample_images(stream, 5), sample_images(memory, 5))
    assert len(sample_images(memory, 10**6)) == len(memory.labels)  # at most the whole split
