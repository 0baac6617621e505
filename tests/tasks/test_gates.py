"""The gated champion decision in a real flow run: the checks as a table artifact, the
reliability diagrams as an image artifact, the decision in the manifest and decision.json, and
a kept challenger leaves the run completed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.champion import CHECKS_KEY, DECISION_KEY, RELIABILITY_KEY
from tests.helpers import (
    TINY_CLASSES,
    artifact_data,
    artifact_keys,
    copy_tiny_dataset,
    log_messages,
    run_dir_of,
    tiny_config,
    train,
)
from visionflow.champion import RELIABILITY, read_champion

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_challenger_within_noise_is_kept_and_every_check_is_published(tmp_path: Path, sample_dataset: Path) -> None:
    tiny_data = copy_tiny_dataset(sample_dataset, tmp_path / "data", TINY_CLASSES, 8, 4)
    out = tmp_path / "out"
    first = train(tiny_config(tiny_data, out, **{"output.champion": "nightly", "data.near_duplicates": True}))
    assert first["champion"]["reason"] == "no champion in the slot yet" and "checks" not in first["champion"]
    second = train(
        tiny_config(tiny_data, out, **{"output.champion": "nightly", "data.near_duplicates": True, "training.seed": 1})
    )
    decision = second["champion"]
    assert second["status"] == "completed" and decision["outcome"] == "kept"
    # 16 eval images, one epoch each: no difference between the two is beyond chance.
    assert decision["reason"].startswith("failed: ") and "significance" in decision["reason"]
    names = [check["check"] for check in decision["checks"]]
    assert names == ["leak-free gain", "significance", "class recall", "class F1", "calibration"]
    run_dir = run_dir_of(second)
    assert json.loads((run_dir / "decision.json").read_text()) == decision
    assert (run_dir / RELIABILITY).is_file()
    assert read_champion(out, "nightly").run_name == first["run_name"]

    flow_run_id = second["prefect_flow_run_id"]
    assert {DECISION_KEY, CHECKS_KEY, RELIABILITY_KEY} <= artifact_keys(flow_run_id)
    rows = artifact_data(flow_run_id, CHECKS_KEY)
    assert [row["check"] for row in rows] == names
    assert {"result", "figure", "rule", "threshold", "detail"} <= set(rows[0])
    assert "data:image/png;base64," in artifact_data(flow_run_id, RELIABILITY_KEY)
    assert "| significance | FAIL |" in artifact_data(flow_run_id, DECISION_KEY)
    assert log_messages(flow_run_id, "challenger kept (failed: ")
