"""The training flow with `data.near_duplicates` and `on_leak: drop-eval` on tiny data with a
planted leak: the leaked eval image is left out of evaluation, both accuracies are recorded, the
run summary shows the leakage rate and the `near-duplicates` artifact is published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps

from tests.helpers import artifact_keys, run_dir_of, tiny_config, train
from visionflow.manifest import Manifest
from visionflow.reports import run_summary_markdown

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.timeout(300)]

PLANTED = "val/cat/leaked-copy.png"


@pytest.fixture(scope="module")
def leaky_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run on the tiny data plus a mirrored copy of a training cat in val."""
    root = tmp_path_factory.mktemp("leaky") / "data"
    shutil.copytree(tiny_data, root)
    original = sorted((root / "train" / "cat").iterdir())[0]
    with Image.open(original) as image:
        ImageOps.mirror(image.convert("RGB")).save(root / PLANTED)
    config = tiny_config(
        root, tmp_path_factory.mktemp("output"), **{"data.near_duplicates": True, "data.on_leak": "drop-eval"}
    )
    return train(config)


def test_leaked_eval_image_is_dropped_and_both_accuracies_recorded(leaky_run: dict[str, Any]) -> None:
    data, metrics = leaky_run["data"], leaky_run["metrics"]
    assert PLANTED in data["leaked_eval"] and PLANTED in data["excluded"]
    assert data["num_eval"] == 16 + 1 - len(data["leaked_eval"])  # 4 classes x 4 val images, plus the copy
    assert data["eval_leakage_rate"] == pytest.approx(len(data["leaked_eval"]) / 17)
    assert 0.0 <= metrics["eval_accuracy_with_leaked"] <= 1.0
    evaluated = json.loads((run_dir_of(leaky_run) / "evaluation.json").read_text())
    assert sum(row["support"] for row in evaluated["per_class"]) == data["num_eval"]  # evaluated without it
    validation = json.loads((run_dir_of(leaky_run) / "validation.json").read_text())
    assert PLANTED in {pair["eval"] for pair in validation["near_duplicates"]["across_splits"]}


def test_summary_and_artifact(leaky_run: dict[str, Any]) -> None:
    run_dir = run_dir_of(leaky_run)
    summary = run_summary_markdown(Manifest.load(run_dir), run_dir)
    assert "Near-duplicate leakage: **" in summary and "with them" in summary
    assert (run_dir / "near_duplicates.png").is_file()
    assert "near-duplicates" in artifact_keys(leaky_run["prefect_flow_run_id"])
