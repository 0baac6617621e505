"""`config.free_fields`, the one answer to "may this field differ?" for resuming and for the training
cache key: whole field names only, and each former disagreement between the two uses as a test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tasks.training import by_training_fields
from visionflow import checkpoints
from visionflow.config import PipelineConfig, build_config, flatten, free_fields
from visionflow.errors import ConfigError
from visionflow.models import build_model
from visionflow.train import engine, records
from visionflow.train.records import ModelSpec
from visionflow.train.rng import seed_everything

NUM_CLASSES = 2


def _split(n: int, seed: int) -> SimpleNamespace:
    """A decoded split: class-dependent brightness, uint8 (N, 3, 32, 32)."""
    labels = torch.arange(n) % NUM_CLASSES  # (N,)
    noise = torch.randint(0, 128, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(images=(noise + labels[:, None, None, None] * 60).to(torch.uint8), labels=labels)


TRAIN, EVAL = _split(32, 0), _split(16, 1)
SPEC = ModelSpec("tudui", NUM_CLASSES, 32, ["a", "b"])


class StopAfter(records.Callback):
    """Ctrl-C right after epoch `epoch` was checkpointed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, metrics: records.EpochMetrics) -> None:
        if metrics.epoch == self.epoch:
            raise KeyboardInterrupt


def _config(**training) -> PipelineConfig:
    # precision and memory format explicit: "auto" would measure this machine and cache the answer.
    fixed = {"epochs": 2, "device": "cpu", "precision": "fp32", "channels_last": False}
    return build_config({"data": {"batch_size": 16}, "training": {**fixed, **training}})


def _fit(config: PipelineConfig, **kwargs) -> records.FitResult:
    seed_everything(config.training.seed)
    return engine.fit(build_model("tudui", NUM_CLASSES), TRAIN, EVAL, config, SPEC, **kwargs)


@pytest.mark.parametrize("use", ["resume", "cache"])
def test_free_fields_are_whole_names_of_config_fields(use):
    names = set(flatten(PipelineConfig().model_dump(mode="json")))
    assert free_fields(use) <= names
    assert "training.device_slots" in free_fields(use)


def test_resume_with_only_device_slots_changed_continues_from_the_next_epoch(tmp_path):
    straight = _fit(_config(device_slots=1))
    with pytest.raises(KeyboardInterrupt):
        _fit(_config(device_slots=1), checkpoint_dir=tmp_path, callbacks=[StopAfter(1)])
    resumed = _fit(_config(device_slots=7), resume_from=tmp_path / "last.pt")
    assert [m.epoch for m in resumed.history] == [1, 2]
    assert resumed.weights_sha256 == straight.weights_sha256


def test_a_field_that_only_starts_like_a_free_one_is_not_free(tmp_path):
    # "training.device" is free to differ on resume; "training.device_kind" (a field of some other
    # version) merely starts with its name and must be compared like any other.
    _fit(_config(epochs=1), checkpoint_dir=tmp_path)
    stored = checkpoints.load_checkpoint(tmp_path / "last.pt")
    assert "training.device" in free_fields("resume") and "training.device_kind" not in free_fields("resume")
    stored["config"]["training"]["device_kind"] = "cpu"
    checkpoints.save_checkpoint(tmp_path / "last.pt", stored)
    with pytest.raises(ConfigError, match=r"config differs in training\.device_kind \(checkpoint 'cpu', now None\)"):
        _fit(_config(epochs=1), resume_from=tmp_path / "last.pt")


def test_the_cache_key_ignores_the_free_fields_and_nothing_else():
    base = by_training_fields(_config())
    assert by_training_fields(_config(device_slots=3, timeout_minutes=5.0)) == base
    assert by_training_fields(_config(distributed={"rdzv_id": "other"})) == base
    assert by_training_fields(_config(seed=1)) != base
    assert by_training_fields(_config(device="auto")) != base  # resume-free only: 'auto' differs by machine
    assert base["training.distributed.world_size"] == 1
