"""Checkpoints: atomic writes, safe loading (nothing executes), exports, hashing, architecture checks."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from visionflow import checkpoints, fileio
from visionflow.checkpoints import (
    FORMAT_VERSION,
    TRAINING_KEYS,
    export_model,
    load_checkpoint,
    load_model,
    load_state_dict,
    load_whole_module,
    save_checkpoint,
    save_state_dict,
    save_whole_module,
    weights_sha256,
)
from visionflow.errors import CheckpointError
from visionflow.fileio import atomic_write_json, atomic_write_text
from visionflow.train.records import ModelSpec

CLASSES = ["cat", "dog", "frog"]


def make_spec(name: str = "tudui", classes: list[str] = CLASSES) -> ModelSpec:
    return ModelSpec(
        name=name,
        num_classes=len(classes),
        input_size=32,
        class_names=list(classes),
        mean=[0.5, 0.4, 0.3],
        std=[0.2, 0.25, 0.3],
    )


def training_state(model: torch.nn.Module, spec: ModelSpec) -> dict:
    """A training checkpoint in the contract's format, from a real optimizer step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=4)
    loss = model(torch.rand(2, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return dict(
        format_version=FORMAT_VERSION,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler={},
        epoch=1,
        step=1,
        rng={"torch": torch.get_rng_state(), "python": list(range(3))},
        config={"model": {"name": spec.name}},
        spec=spec.to_dict(),
        metrics={"eval_accuracy": 0.5},
        history=[{"epoch": 1}],
        best_metric=0.5,
        best_epoch=1,
    )


@pytest.fixture
def model_and_spec():
    torch.manual_seed(0)
    spec = make_spec()
    return spec.build().eval(), spec


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# --- atomic writes ------------------------------------------------------------------------------


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, model_and_spec, monkeypatch):
    model, spec = model_and_spec
    path = tmp_path / "last.pt"
    save_checkpoint(path, training_state(model, spec))
    before = path.read_bytes()

    def crash_midway(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, training_state(model, spec))
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_crash_at_rename_keeps_previous_file(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "manifest.json", "old")

    def fail_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(fileio.os, "replace", fail_replace)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_atomic_write_json_creates_folders_and_round_trips(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "b.json", {"z": 1, "a": [1.5, None]})
    assert json.loads(path.read_text()) == {"z": 1, "a": [1.5, None]}


# --- safe loading -------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_torch_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({key: 0 for key in TRAINING_KEYS} | {"model": Payload(marker)}, path)
    for load in (load_checkpoint, load_model, lambda p: load_state_dict(torch.nn.Linear(1, 1), p)):
        with pytest.raises(CheckpointError) as err:
            load(path)
        assert "posix.system" in assert_one_line(err) and str(path) in str(err.value)
    assert not marker.exists()


def test_malicious_raw_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert_one_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint" * 20, "truncated"])
def test_corrupt_files_raise_one_line_checkpoint_error(tmp_path, model_and_spec, content):
    model, spec = model_and_spec
    path = tmp_path / "bad.pt"
    if content == "truncated":
        save_checkpoint(path, training_state(model, spec))
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in assert_one_line(err)


def test_missing_file_names_what_was_expected(tmp_path):
    with pytest.raises(CheckpointError, match="not found: expected a training checkpoint") as err:
        load_model(tmp_path / "nope.pt")
    assert_one_line(err)


def test_plain_state_dict_is_not_a_training_checkpoint(tmp_path, model_and_spec):
    model, _ = model_and_spec
    path = save_state_dict(model, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="not a visionflow training checkpoint: found 0.bias") as err:
        load_checkpoint(path)
    assert_one_line(err)


def test_newer_format_version_is_refused(tmp_path, model_and_spec):
    model, spec = model_and_spec
    path = save_checkpoint(tmp_path / "c.pt", training_state(model, spec) | {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(CheckpointError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_checkpoint(path)


def test_save_checkpoint_validates_keys_and_weights_only_safety(tmp_path, model_and_spec):
    model, spec = model_and_spec
    state = training_state(model, spec)
    with pytest.raises(CheckpointError, match="missing best_epoch, best_metric"):
        save_checkpoint(tmp_path / "c.pt", {k: v for k, v in state.items() if not k.startswith("best")})
    with pytest.raises(CheckpointError, match=r"state\['rng'\]\['numpy'\] \(numpy.ndarray\)"):
        save_checkpoint(tmp_path / "c.pt", state | {"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "c.pt").exists()


# --- models: training checkpoints, exports, tutorial methods ------------------------------------


def test_training_checkpoint_and_export_rebuild_the_same_model(tmp_path, model_and_spec):
    model, spec = model_and_spec
    state = training_state(model, spec)
    ckpt = save_checkpoint(tmp_path / "best.pt", state)
    export = export_model(model, spec, tmp_path / "export")
    assert json.loads(Path(export["spec"]).read_text())["class_names"] == CLASSES
    x = torch.rand(2, 3, 32, 32)
    expected = model.eval()(x)
    for source in (ckpt, tmp_path / "export", Path(export["weights"])):
        loaded, loaded_spec = load_model(source)
        assert loaded_spec == spec and not loaded.training
        torch.testing.assert_close(loaded(x), expected)


def test_weights_sha256_is_format_independent_and_content_sensitive(tmp_path, model_and_spec):
    model, spec = model_and_spec
    ckpt = save_checkpoint(tmp_path / "c.pt", training_state(model, spec))
    export = export_model(model, spec, tmp_path / "export")
    from_pt = weights_sha256(load_checkpoint(ckpt)["model"])
    from safetensors.torch import load_file

    assert from_pt == weights_sha256(load_file(export["weights"])) == export["weights_sha256"]
    assert from_pt == weights_sha256({k: v.clone() for k, v in reversed(model.state_dict().items())})
    changed = dict(model.state_dict()) | {"0.bias": model.state_dict()["0.bias"] + 1e-6}
    assert weights_sha256(changed) != from_pt
    assert weights_sha256({"w": torch.ones(2, dtype=torch.bfloat16)}) != weights_sha256({"w": torch.ones(2)})


def test_wrong_architecture_lists_missing_unexpected_keys_on_one_line(tmp_path, model_and_spec):
    model, spec = model_and_spec
    path = save_checkpoint(
        tmp_path / "c.pt", training_state(model, spec) | {"spec": make_spec("resnet18_cifar").to_dict()}
    )
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = assert_one_line(err)
    assert "missing keys bn1.bias" in message and "more)" in message and "unexpected keys 0.bias" in message


def test_shape_mismatch_is_reported_with_both_shapes(tmp_path, model_and_spec):
    model, _ = model_and_spec
    path = save_state_dict(model, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches 8.bias \(file \[3\] vs model \[10\]\)") as err:
        load_state_dict(make_spec(classes=[str(i) for i in range(10)]).build(), path)
    assert_one_line(err)


def test_export_with_swapped_weights_or_missing_spec_is_refused(tmp_path, model_and_spec):
    model, spec = model_and_spec
    first = export_model(model, spec, tmp_path / "a")
    export_model(spec.build(), spec, tmp_path / "b")
    os.replace(tmp_path / "b" / "model.safetensors", first["weights"])
    with pytest.raises(CheckpointError, match="do not match the weights_sha256"):
        load_model(tmp_path / "a")
    Path(first["spec"]).unlink()
    with pytest.raises(CheckpointError, match=r"model.json' not found"):
        load_model(tmp_path / "a")


def test_inconsistent_spec_is_refused(tmp_path, model_and_spec):
    model, spec = model_and_spec
    export = export_model(model, spec, tmp_path / "export")
    values = json.loads(Path(export["spec"]).read_text()) | {"class_names": ["a", "b"], "std": [1, 0, 1]}
    Path(export["spec"]).write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match=r"num_classes 3 does not match class_names \['a', 'b'\]; std"):
        load_model(tmp_path / "export")


def test_whole_module_needs_trust(tmp_path, model_and_spec):
    model, _ = model_and_spec
    path = save_whole_module(model, tmp_path / "whole.pth")
    with pytest.raises(CheckpointError, match="can run arbitrary code; pass trust=True") as err:
        load_whole_module(path)
    assert_one_line(err)
    with pytest.raises(CheckpointError, match=r"refused by the safe \(weights_only\) loader"):
        load_model(path)  # the safe path refuses a pickled module too
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(load_whole_module(path, trust=True)(x), model(x))


def test_state_dict_round_trip_and_from_training_checkpoint(tmp_path, model_and_spec):
    model, spec = model_and_spec
    x = torch.rand(1, 3, 32, 32)
    state = training_state(model, spec)  # steps the model first
    for path in (save_state_dict(model, tmp_path / "w.pth"), save_checkpoint(tmp_path / "c.pt", state)):
        fresh = load_state_dict(spec.build().eval(), path)
        torch.testing.assert_close(fresh(x), model(x))
