"""`visionflow train` with backbones and pretrained weights: the offline ImageNet error and a
missing run are one line before anything runs; a timm model fine-tunes from a weights file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.helpers import TINY_CLASSES, copy_tiny_dataset, run_main
from visionflow.fileio import file_sha256
from visionflow.models import build_model


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ("imagenet", "are not in {torch}/hub/checkpoints and cannot be downloaded"),
        ("run:nope", "model.weights 'run:nope': '{out}/runs/nope/checkpoints/best.pt' does not exist"),
    ],
)
def test_weights_that_cannot_be_had_are_one_line_before_anything_runs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights: str, expected: str
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache, offline
    out = tmp_path / "out"
    code, stdout, err = run_main(capsys, "train", "--model", "resnet18", "--weights", weights, "--output", str(out))
    assert code == 2 and stdout == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert expected.format(torch=tmp_path / "torch", out=out) in err
    assert not out.exists() and not (tmp_path / "torch").exists()  # nothing written, nothing half-downloaded


@pytest.mark.slow
def test_a_timm_model_fine_tunes_from_a_weights_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sample_dataset: Path
) -> None:
    data = copy_tiny_dataset(sample_dataset, tmp_path / "data", TINY_CLASSES[:2], 8, 4)
    torch.manual_seed(0)
    weights = tmp_path / "resnet10t.safetensors"  # stands in for timm's ImageNet file (made here)
    safetensors.torch.save_file(build_model("timm/resnet10t", 1000).state_dict(), weights)
    out = tmp_path / "out"
    code, stdout, err = run_main(
        capsys,
        "train", "--dataset", str(data), "--model", "timm/resnet10t", "--weights", str(weights),
        "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
        "--output", str(out), "--run-name", "timm",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "runs" / "timm" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["model"]["name"] == "timm/resnet10t"
    assert manifest["config"]["optim"]["recipe"] == "finetune" and manifest["model"]["head"] == "fc"
    assert manifest["model"]["weights_sha256"] == file_sha256(weights)
    assert manifest["config"]["data"]["crop_pct"] == 0.875  # timm's metadata for resnet10t; the size was given
