"""Fine-tuning through the training flow: a run's weights start another run on other classes
(`model.weights run:NAME`), the finetune recipe and the source's preprocessing are taken, the
weights' sha256 is recorded and keys the training cache, and reproducing refuses a changed file."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from flows.reproduce import reproduce_run
from tests.helpers import copy_tiny_dataset, run_dir_of, tiny_config, train
from visionflow.errors import CheckpointError
from visionflow.fileio import file_sha256

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("output")


@pytest.fixture(scope="module")
def source(tiny_data: Path, output: Path) -> dict[str, Any]:
    """The run whose weights the others start from: tudui on 4 classes."""
    return train(tiny_config(tiny_data, output, **{"output.run_name": "source"}))


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory: pytest.TempPathFactory, sample_dataset: Path) -> Path:
    """Two classes the source run never saw."""
    return copy_tiny_dataset(sample_dataset, tmp_path_factory.mktemp("other") / "data", ("bird", "deer"), 8, 4)


def _finetune(two_classes: Path, output: Path, name: str) -> dict[str, Any]:
    overrides = {"model.weights": "run:source", "training.epochs": 2, "output.run_name": name}
    return train(tiny_config(two_classes, output, **overrides))


def test_a_runs_weights_start_a_run_on_other_classes(source, two_classes, output):
    tuned = _finetune(two_classes, output, "tuned")
    best = run_dir_of(source) / "checkpoints" / "best.pt"
    config = tuned["config"]
    assert config["optim"]["recipe"] == "finetune" and config["model"]["freeze_epochs"] == 1
    assert config["model"]["weights_sha256"] == file_sha256(best) == tuned["model"]["weights_sha256"]
    assert config["data"]["mean"] == source["config"]["data"]["mean"]  # the source's normalization
    assert config["data"]["image_size"] == 32 and config["data"]["crop_pct"] == 1.0  # the source's input
    assert tuned["model"]["frozen"] == "all but the head 8 in epochs 1-1, BatchNorm statistics included"
    assert tuned["model"]["head_parameters"] == 64 * 2 + 2  # Linear(64, 2): the new head for two classes
    assert "weights: run:source" in (run_dir_of(tuned) / "model.txt").read_text()


def test_the_training_cache_follows_the_weights_file_and_reproduce_refuses_a_changed_one(source, two_classes, output):
    first = _finetune(two_classes, output, "cached-a")
    again = _finetune(two_classes, output, "cached-b")
    assert again["tasks"]["train_model"] == "cached"
    best = run_dir_of(source) / "checkpoints" / "best.pt"
    kept = best.with_suffix(".kept")
    shutil.copy2(best, kept)
    shutil.copy2(run_dir_of(first) / "checkpoints" / "best.pt", best)  # other weights under the source's name
    try:
        changed = _finetune(two_classes, output, "cached-c")
        assert changed["tasks"]["train_model"] != "cached"
        assert changed["model"]["weights_sha256"] == file_sha256(best) != first["model"]["weights_sha256"]
        with pytest.raises(CheckpointError, match="the file changed since"):
            reproduce_run(str(run_dir_of(first)))
    finally:
        shutil.copy2(kept, best)
