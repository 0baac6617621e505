"""`visionflow export`: a checked ONNX export of a really trained checkpoint, a deliberately broken
export (its weights perturbed on the way out) refused with one line and nothing written, and no
images to check on refused the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.cli import main
from tests.helpers import TINY_CLASSES, copy_tiny_dataset, trained_checkpoint
from visionflow import exports


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sample_dataset: Path) -> Path:
    work = tmp_path_factory.mktemp("cli-export")
    return trained_checkpoint(copy_tiny_dataset(sample_dataset, work / "data", TINY_CLASSES, 8, 4), work)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_writes_a_checked_onnx_model(checkpoint, tmp_path, capsys):
    code, out, err = run(
        capsys, "export", "--checkpoint", checkpoint, "--format", "onnx", "--out", tmp_path / "x", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["max_difference"] <= exports.PARITY_TOLERANCE and result["images"] == 16
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["model.json", "model.onnx"]


def test_a_broken_export_is_refused_and_nothing_is_written(checkpoint, tmp_path, capsys, monkeypatch):
    write = exports.write_format

    def perturbed(fmt, model, spec, folder):  # the exported copy's weights, not the original's
        copy = spec.build()
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            for parameter in copy.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        return write(fmt, copy, spec, folder)

    monkeypatch.setattr(exports, "write_format", perturbed)
    for fmt in ("onnx", "torchscript"):
        code, out, err = run(capsys, "export", "--checkpoint", checkpoint, "--format", fmt, "--out", tmp_path / fmt)
        assert code == 2 and out == ""
        assert len(err.splitlines()) == 1 and err.startswith(f"error: Refused the {fmt} export"), err
        assert "above the tolerance" in err and not (tmp_path / fmt).exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left either


def test_no_images_to_check_on_is_refused(tmp_path, capsys):
    from visionflow.checkpoints import export_model
    from visionflow.train.records import ModelSpec

    spec = ModelSpec("tudui", 2, 32, ["a", "b"])
    export_model(spec.build(), spec, tmp_path / "plain")
    code, _, err = run(
        capsys, "export", "--checkpoint", tmp_path / "plain", "--format", "onnx", "--out", tmp_path / "x"
    )
    assert code == 2 and err.startswith("error: No images to check the export of") and "--images" in err
    assert not (tmp_path / "x").exists()
