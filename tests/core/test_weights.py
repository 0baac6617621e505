"""Pretrained weights (visionflow.weights): every source located and hashed, the offline and
hash-check errors of the ImageNet path, loading all but the head, and what the weights fill in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tasks.training import by_training_fields
from visionflow.config import ModelConfig, build_config
from visionflow.errors import CheckpointError, ConfigError
from visionflow.models import build_model
from visionflow.weights import file_sha256, load_pretrained, locate, read_state_dict, with_weights

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _saved_resnet18(path: Path, seed: int = 0) -> Path:
    """A torchvision ResNet-18 state dict with 1000 classes, as its ImageNet file is laid out (made here)."""
    torch.manual_seed(seed)
    torch.save(build_model("resnet18", 1000).state_dict(), path)
    return path


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_offline_torchvision_imagenet_names_the_file_the_folder_and_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # this test's own hub cache: empty
    with pytest.raises(ConfigError) as caught:
        locate(ModelConfig(name="resnet18", weights="imagenet"), tmp_path)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    message = _one_line(caught)
    assert f"place resnet18-f37072fd.pth in {folder}" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert not (folder / "resnet18-f37072fd.pth").exists()  # nothing half-downloaded left behind


def test_a_cached_file_failing_torchvisions_hash_check_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    wrong = _saved_resnet18(folder / "resnet18-f37072fd.pth")  # the right name, other bytes
    with pytest.raises(CheckpointError) as caught:
        locate(ModelConfig(name="resnet18", weights="imagenet"), tmp_path)
    assert f"'{wrong}' fail the hash check" in _one_line(caught) and "the file name says f37072fd" in str(caught.value)


def test_offline_timm_imagenet_names_the_file_and_the_url(tmp_path):
    # resnet14t: no other test puts it in the session's Hugging Face cache
    with pytest.raises(ConfigError) as caught:
        locate(ModelConfig(name="timm/resnet14t.c3_in1k", weights="imagenet"), tmp_path)
    message = _one_line(caught)
    assert "model.safetensors of timm/resnet14t.c3_in1k are not in the Hugging Face cache" in message
    assert "https://huggingface.co/timm/resnet14t.c3_in1k/resolve/main/model.safetensors" in message


def test_timm_imagenet_weights_are_read_from_the_hugging_face_cache(tmp_path):
    # The Hugging Face cache layout (what a download leaves), filled with weights made here.
    repo = Path(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub" / "models--timm--resnet10t.c3_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    torch.manual_seed(1)
    made_here = build_model("timm/resnet10t", 1000).state_dict()
    safetensors.torch.save_file(made_here, snapshot / "model.safetensors")
    weights = locate(ModelConfig(name="timm/resnet10t.c3_in1k", weights="imagenet"), tmp_path)
    assert Path(weights.path) == snapshot / "model.safetensors"
    assert (weights.image_size, weights.crop_pct, weights.mean) == (176, 0.875, IMAGENET_MEAN)  # timm's metadata
    model = build_model("timm/resnet10t.c3_in1k", 3)
    load_pretrained(model, weights)
    assert torch.equal(model.state_dict()["conv1.0.weight"], made_here["conv1.0.weight"])
    assert model.fc.out_features == 3


def test_a_local_file_loads_all_but_the_head_and_brings_the_models_imagenet_preprocessing(tmp_path):
    path = _saved_resnet18(tmp_path / "resnet18.pth")
    weights = locate(ModelConfig(name="resnet18", weights=str(path)), tmp_path)
    assert weights.sha256 == file_sha256(path) and weights.path == str(path)
    assert (weights.image_size, weights.crop_pct, weights.mean, weights.std) == (
        224,
        0.875,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    torch.manual_seed(5)
    model = build_model("resnet18", 2)
    head_before = model.fc.weight.clone()
    load_pretrained(model, weights)
    source = torch.load(path, weights_only=True)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items() if not k.startswith("fc."))
    assert torch.equal(model.fc.weight, head_before)  # the new head keeps its seeded initialization


def test_weights_of_another_architecture_are_refused_naming_the_mismatch(tmp_path):
    path = _saved_resnet18(tmp_path / "resnet18.pth")
    weights = locate(ModelConfig(name="resnet34", weights=str(path)), tmp_path)
    with pytest.raises(CheckpointError) as caught:
        load_pretrained(build_model("resnet34", 2), weights)
    assert "do not fit ResNet" in _one_line(caught) and "missing keys layer1.2" in str(caught.value)


def test_a_file_that_changed_since_the_run_recorded_it_is_refused(tmp_path):
    path = _saved_resnet18(tmp_path / "resnet18.pth")
    recorded = file_sha256(path)
    _saved_resnet18(path, seed=1)
    with pytest.raises(CheckpointError) as caught:
        locate(ModelConfig(name="resnet18", weights=str(path), weights_sha256=recorded), tmp_path)
    assert f"the run recorded {recorded[:12]}" in _one_line(caught)


def test_missing_sources_are_one_line_errors(tmp_path):
    for weights, expected in [
        ("run:nope", "does not exist (expected a run under"),
        ("champion:nightly", "that champion slot is empty"),
        (str(tmp_path / "missing.safetensors"), "does not exist (expected a .pt, .pth or .safetensors weights file)"),
    ]:
        with pytest.raises(ConfigError) as caught:
            locate(ModelConfig(name="resnet18", weights=weights), tmp_path)
        assert expected in _one_line(caught)
    with pytest.raises(ConfigError, match="'tudui' is visionflow's own model, with no pretrained weights"):
        locate(ModelConfig(name="tudui", weights="imagenet"), tmp_path)


def test_the_config_refuses_weights_it_cannot_name():
    with pytest.raises(ConfigError, match="model.weights"):
        build_config({"model": {"weights": "weights.bin"}})


def test_the_weights_fill_what_the_config_leaves_empty_and_pick_the_finetune_recipe(tmp_path):
    path = _saved_resnet18(tmp_path / "resnet18.pth")
    config = build_config({"model": {"name": "resnet18", "weights": str(path)}, "data": {"crop_pct": 1.0}})
    filled = with_weights(config, locate(config.model, tmp_path)).resolved()
    assert filled.optim.recipe == "finetune" and filled.model.freeze_epochs == 1
    assert filled.data.image_size == 224 and filled.data.mean == IMAGENET_MEAN
    assert filled.data.crop_pct == 1.0  # what the user set stays
    assert filled.model.weights_sha256 == file_sha256(path)
    assert build_config({}).resolved().optim.recipe == "default"  # no weights: trained from scratch


def test_the_training_cache_key_changes_with_the_weights_file(tmp_path):
    path = _saved_resnet18(tmp_path / "resnet18.pth")
    config = build_config({"model": {"name": "resnet18", "weights": str(path)}})
    before = by_training_fields(with_weights(config, locate(config.model, tmp_path)).resolved())
    _saved_resnet18(path, seed=1)  # same path, other weights
    after = by_training_fields(with_weights(config, locate(config.model, tmp_path)).resolved())
    assert before["model.weights_sha256"] != after["model.weights_sha256"]
    assert {k for k in before if before[k] != after[k]} == {"model.weights_sha256"}


def test_state_dicts_of_training_scripts_are_unwrapped(tmp_path):
    state = build_model("tudui", 2).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "c.pt")
    assert read_state_dict(tmp_path / "c.pt").keys() == state.keys()
