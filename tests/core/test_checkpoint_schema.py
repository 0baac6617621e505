"""The training checkpoint's one schema (`checkpoints.TrainingCheckpoint`): what the engine writes,
what loading requires, and checkpoints written by older code (tests/fixtures/written_by_0.1) still
loading and resuming."""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import torch

from visionflow import checkpoints, steps
from visionflow.checkpoints import ADDED_KEYS, TRAINING_KEYS, TrainingCheckpoint
from visionflow.config import build_config
from visionflow.data.splits import resolve_dataset
from visionflow.models import build_model
from visionflow.train import engine
from visionflow.train.records import ModelSpec

OLD_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "written_by_0.1" / "runs" / "cut"
SCHEMA = {field.name for field in fields(TrainingCheckpoint)}


def test_the_engine_writes_exactly_the_schemas_keys(tmp_path):
    labels = torch.arange(16) % 2  # (N,)
    split = SimpleNamespace(images=torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8), labels=labels)
    config = build_config(
        {
            "data": {"batch_size": 8},
            "training": {"epochs": 1, "device": "cpu", "precision": "fp32", "channels_last": False},
        }
    )
    engine.fit(build_model("tudui", 2), split, split, config, ModelSpec("tudui", 2, 32, ["a", "b"]), tmp_path)
    written = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(written) == SCHEMA and written["format_version"] == checkpoints.FORMAT_VERSION
    assert TRAINING_KEYS == SCHEMA - ADDED_KEYS.keys()


def test_a_checkpoint_from_before_an_added_key_reads_its_meaning(tmp_path):
    stored = checkpoints.load_checkpoint(OLD_RUN / "checkpoints" / "last.pt")
    older = {key: value for key, value in stored.items() if key not in ADDED_KEYS}
    path = checkpoints.save_checkpoint(tmp_path / "last.pt", older)
    assert TrainingCheckpoint.from_dict(checkpoints.load_checkpoint(path)).world_size == 1


def test_an_interrupted_run_written_by_0_1_resumes_from_epoch_2(tmp_path):
    # `visionflow train --dataset sample --epochs 3 --run-name cut`, Ctrl-C after epoch 1 (README there).
    run_dir = tmp_path / "out" / "runs" / "cut"
    shutil.copytree(OLD_RUN, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    stored = checkpoints.load_checkpoint(last)
    training = stored["config"]["training"]
    # precision and channels_last "auto" are decided per machine: take the writer's choice. The
    # device and where data and outputs live may differ (config.free_fields).
    values = {
        "data": {"dataset": "sample", "data_dir": str(tmp_path / "data")},
        "training": {"epochs": 3, "device": "cpu", **{key: training[key] for key in ("precision", "channels_last")}},
        "output": {"output_dir": str(tmp_path / "out"), "run_name": "cut"},
    }
    result = steps.train_run(run_dir, resolve_dataset("sample", tmp_path / "data"), build_config(values), last)
    assert [m.epoch for m in result.history] == [1, 2, 3]
    assert result.history[0].eval_accuracy == stored["history"][0]["eval_accuracy"]  # epoch 1 as stored
    assert checkpoints.load_checkpoint(last)["epoch"] == 3
