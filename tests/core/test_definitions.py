"""Concepts defined once and derived everywhere: the usable cores, the UTC timestamp, the run's file
and run names, the champion decision inside a manifest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.helpers import REPO
from visionflow.config import RUN_NAME_MAX, OutputConfig, name_pattern
from visionflow.manifest import MANIFEST_NAME, ChampionDecision, Manifest, utc_timestamp
from visionflow.runs import (
    BEST_CHECKPOINT_PATH,
    EXPORT_WEIGHTS,
    EXPORT_WEIGHTS_PATH,
    PER_CLASS_CSV,
    TENSORBOARD_SUBDIR,
    VALIDATION_ISSUES_CSV,
    RunLayout,
    generate_run_name,
)
from visionflow.sweep import NAME_PATTERN

# What every consumer of the core count answers in a process restricted to one core.
_ONE_CORE_PROBE = """
import json, os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from visionflow.config import load_config
from visionflow.cores import usable_cores
from visionflow.data.decoded import default_num_workers
from visionflow.data.images import worker_count
from visionflow.sweep import trial_threads
from visionflow.train.device_limits import device_claim
from visionflow.train.distributed import intra_op_threads

print(json.dumps({
    "usable_cores": usable_cores(),
    "image_threads": worker_count(),
    "stream_workers": default_num_workers(),
    "trial_threads": trial_threads(1),
    "rank_threads": intra_op_threads(1),
    "cpu_limit_slots": device_claim(load_config(None, {"training.device": "cpu"}).training).slots,
}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_every_core_count_follows_the_cpu_affinity() -> None:
    """A process restricted to one core (taskset, a container's cpuset) sizes every pool by that
    one core, whatever os.cpu_count() says about the machine."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _ONE_CORE_PROBE], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout) == {
        "usable_cores": 1,
        "image_threads": 5,  # one core + 4 for file I/O waits
        "stream_workers": 1,
        "trial_threads": 1,
        "rank_threads": 1,
        "cpu_limit_slots": 1,
    }


FIXTURE_RUNS = REPO / "tests" / "fixtures" / "written_by_0.1" / "runs"
# A decision as the code before the typed record wrote it into a manifest (ChampionDecision.to_dict,
# a dataclass's fields plus "outcome").
OLD_DECISION = {
    "slot": "nightly",
    "metric": "eval_accuracy",
    "promoted": True,
    "reason": "no champion in the slot yet",
    "challenger_run": "done",
    "challenger_score": 0.5,
    "challenger_weights_sha256": "ab" * 32,
    "champion_run": None,
    "champion_score": None,
    "champion_weights_sha256": None,
    "eval_split": "val",
    "eval_images": 40,
    "decided_at": "2026-01-01T00:00:00+00:00",
    "data_changes": None,
    "outcome": "promoted",
}


@pytest.mark.parametrize("run", ["done", "cut"])
def test_manifests_written_by_0_1_load_with_their_champion_typed(run: str, tmp_path: Path) -> None:
    raw = json.loads((FIXTURE_RUNS / run / MANIFEST_NAME).read_text())
    assert Manifest.load(FIXTURE_RUNS / run).champion is None
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**raw, "champion": OLD_DECISION}))
    decision = Manifest.load(tmp_path).champion
    assert isinstance(decision, ChampionDecision)
    assert (decision.outcome, decision.slot, decision.challenger_score) == ("promoted", "nightly", 0.5)
    # Written back, the decision has the keys it had (outcome included): the same output as before.
    Manifest.load(tmp_path).save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / MANIFEST_NAME).read_text())["champion"] == OLD_DECISION
    assert decision.to_dict() == OLD_DECISION


def test_a_kept_decision_reads_kept() -> None:
    kept = ChampionDecision.model_validate({**OLD_DECISION, "promoted": False, "outcome": "promoted"})
    assert kept.outcome == "kept"  # derived from `promoted`, whatever a file said


def test_timestamps_are_utc_to_the_second() -> None:
    paris = datetime(2026, 3, 1, 13, 4, 5, 678, tzinfo=timezone(timedelta(hours=1)))
    assert utc_timestamp(paris) == "2026-03-01T12:04:05+00:00"
    now = datetime.fromisoformat(utc_timestamp())
    assert now.utcoffset() == timedelta(0) and now.microsecond == 0


def test_run_slot_and_sweep_names_share_one_pattern() -> None:
    """A generated run name, a sweep name and a trial name made of it are all valid run names."""
    run_name = OutputConfig.model_fields["run_name"].metadata
    assert name_pattern() == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
    assert NAME_PATTERN == name_pattern(RUN_NAME_MAX - 20)
    generated = generate_run_name("/data/my ants!/", "tudui")
    longest_trial = "s" * (RUN_NAME_MAX - 20) + "-9999-abcdef"
    for name in (generated, longest_trial):
        assert re.fullmatch(name_pattern(), name), name
        OutputConfig(run_name=name, champion=name)
    assert any(getattr(item, "pattern", None) == name_pattern() for item in run_name)


def test_run_files_are_named_once() -> None:
    """RunLayout's paths are the module's names; the CSV writers write exactly those files."""
    layout = RunLayout(Path("/r"))
    assert layout.best_checkpoint == layout.root / BEST_CHECKPOINT_PATH
    assert layout.export_dir / EXPORT_WEIGHTS == layout.root / EXPORT_WEIGHTS_PATH
    assert layout.tensorboard.name == TENSORBOARD_SUBDIR
    assert (layout.per_class_csv.name, layout.validation_issues_csv.name) == (PER_CLASS_CSV, VALIDATION_ISSUES_CSV)
