"""The label-issue task in a real flow run: JSON, table and grid artifacts, and drop-train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.label_issues import GRID_KEY, ISSUES_KEY
from tests.helpers import TINY_CLASSES, artifact_data, artifact_keys, copy_tiny_dataset, run_dir_of, tiny_config, train
from visionflow.label_issues import GRID_NAME, REPORT_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_drop_train_leaves_the_suspects_out_of_training(tmp_path: Path, sample_dataset: Path) -> None:
    data = copy_tiny_dataset(sample_dataset, tmp_path / "data", TINY_CLASSES, 8, 4)
    overrides = {"label_issues.enabled": True, "label_issues.folds": 2, "label_issues.on_issue": "drop-train"}
    manifest = train(tiny_config(data, tmp_path / "out", **overrides))
    run_dir = run_dir_of(manifest)
    report = json.loads((run_dir / REPORT_NAME).read_text())
    suspects = [f"train/{issue['file']}" for issue in report["issues"]]
    assert report["num_train"] == 8 * len(TINY_CLASSES) and (run_dir / GRID_NAME).is_file()
    assert set(suspects) <= set(manifest["data"]["excluded"])
    assert manifest["data"]["num_train"] == report["num_train"] - len(suspects)
    assert manifest["tasks"]["search_label_issues"] == "completed"
    flow_run_id = manifest["prefect_flow_run_id"]
    assert {ISSUES_KEY, GRID_KEY} <= artifact_keys(flow_run_id)
    assert [row["file"] for row in artifact_data(flow_run_id, ISSUES_KEY)] == [i["file"] for i in report["issues"]]
