"""Run directories keyed on the orchestrator's run: a rerun of the same Prefect flow run (a retry,
a crashed run rescheduled) reopens its unfinished directory; anything else never does."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from visionflow.config import PipelineConfig, load_config
from visionflow.manifest import Manifest
from visionflow.runs import generate_run_name, open_run

FLOW_RUN = "0d6c1f0e-3b9a-4c55-9a57-5b1f2a7d41e2"
OTHER_FLOW_RUN = "7a1e9c44-2f0b-4d3e-8f61-0c9b7e5a3d10"
NAME = "train-sample-tudui-20261128-023000-41e2"


def config(output: Path) -> PipelineConfig:
    return load_config(None, {"output.output_dir": str(output)}).resolved()


def test_generated_name_takes_the_given_time_and_suffix() -> None:
    now = datetime(2026, 11, 28, 2, 30, 0)
    assert generate_run_name("data/nightly/", "resnet18", now=now, suffix="41e2") == (
        "train-nightly-resnet18-20261128-023000-41e2"
    )
    random = generate_run_name("sample", "tudui", now=now)
    assert random.startswith("train-sample-tudui-20261128-023000-") and len(random.rsplit("-", 1)[1]) == 4


def test_the_same_flow_run_reopens_its_unfinished_run_and_resumes_from_last_pt(tmp_path: Path) -> None:
    layout, resume_from = open_run(config(tmp_path), "2026-11-28T02:30:00", FLOW_RUN, proposed=NAME)
    assert (layout.name, resume_from) == (NAME, None)
    layout.checkpoints.mkdir()
    layout.last_checkpoint.write_bytes(b"epoch 3")  # what the crashed process left

    again, resume_from = open_run(config(tmp_path), "2026-11-28T03:00:00", FLOW_RUN, proposed=NAME)
    assert again.root == layout.root and resume_from == layout.last_checkpoint.resolve()
    assert Manifest.load(again.root).started_at == "2026-11-28T03:00:00"


def test_a_crash_before_the_first_checkpoint_reopens_the_run_from_scratch(tmp_path: Path) -> None:
    layout, _ = open_run(config(tmp_path), "2026-11-28T02:30:00", FLOW_RUN, proposed=NAME)
    again, resume_from = open_run(config(tmp_path), "2026-11-28T03:00:00", FLOW_RUN, proposed=NAME)
    assert again.root == layout.root and resume_from is None


def test_another_flow_run_or_a_completed_run_never_reopens_the_directory(tmp_path: Path) -> None:
    layout, _ = open_run(config(tmp_path), "2026-11-28T02:30:00", FLOW_RUN, proposed=NAME)
    layout.checkpoints.mkdir()
    layout.last_checkpoint.write_bytes(b"epoch 3")

    other, resume_from = open_run(config(tmp_path), "2026-11-28T02:30:00", OTHER_FLOW_RUN, proposed=NAME)
    assert other.root != layout.root and resume_from is None
    assert other.name.startswith("train-sample-tudui-")

    Manifest.load(layout.root).finish("completed").save(layout.root)
    rerun, resume_from = open_run(config(tmp_path), "2026-11-28T04:00:00", FLOW_RUN, proposed=NAME)
    assert rerun.root not in (layout.root, other.root) and resume_from is None
    assert Manifest.load(layout.root).status == "completed"  # untouched


def test_without_a_flow_run_id_an_existing_name_is_never_reopened(tmp_path: Path) -> None:
    layout, _ = open_run(config(tmp_path), "2026-11-28T02:30:00", None, proposed=NAME)
    again, resume_from = open_run(config(tmp_path), "2026-11-28T02:30:00", None, proposed=NAME)
    assert again.root != layout.root and resume_from is None
