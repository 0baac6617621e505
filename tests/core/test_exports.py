"""Exports with parity (visionflow.exports) of a tudui checkpoint trained for one epoch on a small
copy of the bundled sample: ONNX and TorchScript agree with PyTorch within the tolerance on the run's
eval split, their batch axis is free, the spec travels with every format, safetensors loads back."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from tests.helpers import TINY_CLASSES, copy_tiny_dataset, trained_checkpoint
from visionflow.checkpoints import load_model
from visionflow.exports import PARITY_TOLERANCE, Probabilities, export_checked, format_runner


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sample_dataset: Path) -> Path:
    work = tmp_path_factory.mktemp("exports")
    return trained_checkpoint(copy_tiny_dataset(sample_dataset, work / "data", TINY_CLASSES, 8, 4), work)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_agrees_with_pytorch_on_the_eval_split(checkpoint, tmp_path, fmt):
    result = export_checked(checkpoint, fmt, tmp_path / fmt)
    assert result.images == 16 and result.max_difference <= PARITY_TOLERANCE  # 4 classes x 4 val images
    assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == sorted(["model.json", result.file.name])
    model, spec = load_model(checkpoint)
    written = json.loads(result.spec.read_text())
    assert {key: written[key] for key in ("class_names", "input_size", "mean", "std")} == {
        "class_names": list(TINY_CLASSES),
        "input_size": 32,
        "mean": spec.mean,
        "std": spec.std,
    }
    assert written["format"] == fmt and written["parity"]["tolerance"] == PARITY_TOLERANCE
    run = format_runner(fmt, result.file, spec)
    for batch in (1, 5):  # any batch size
        images = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            assert torch.allclose(run(images), Probabilities(model, spec.test_flip)(images), atol=PARITY_TOLERANCE)
    if fmt == "onnx":
        onnx.checker.check_model(str(result.file), full_check=True)


def test_safetensors_export_is_a_loadable_export(checkpoint, tmp_path):
    result = export_checked(checkpoint, "safetensors", tmp_path / "st")
    assert result.max_difference == 0.0
    model, spec = load_model(tmp_path / "st")
    original, _ = load_model(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert spec.class_names == list(TINY_CLASSES)
