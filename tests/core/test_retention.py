"""Retention plan and removal on real run directories: newest N and young runs kept, the
champion's run and a running run kept, dry run removes nothing, hard links counted once,
orphaned cached results removed with their run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import MB, age, make_run
from visionflow.champion import DECISION, MODELS_SUBDIR
from visionflow.errors import ConfigError
from visionflow.fileio import atomic_write_json, link_or_copy
from visionflow.retention import (
    RESULTS_SUBDIR,
    check_retention,
    collect_garbage,
    disk_usage,
    freed_by,
    plan_gc,
)
from visionflow.runs import EXPORT_SPEC


def make_champion(output: Path, slot: str, run_name: str) -> None:
    version = output / MODELS_SUBDIR / f".{slot}" / "v1"
    atomic_write_json(version / EXPORT_SPEC, {"weights_sha256": "ab" * 32})
    atomic_write_json(version / DECISION, {"challenger_run": run_name})
    os.symlink(Path(f".{slot}") / "v1", output / MODELS_SUBDIR / slot, target_is_directory=True)


def make_result(output: Path, key: str, run_dir: Path) -> Path:
    """A cached result record in a format of this test's own (`json_result_files` reads it): the
    core does not parse Prefect's (tests/tasks/test_prefect_compat.py gc's real records)."""
    record = output / RESULTS_SUBDIR / key
    atomic_write_json(record, {"files": [str((run_dir / "checkpoints" / "best.pt").resolve())]})
    return record


def json_result_files(record: Path) -> list[str] | None:
    try:
        return json.loads(record.read_text())["files"]
    except ValueError:
        return None


def test_newest_young_champion_and_running_runs_are_kept(tmp_path: Path) -> None:
    for index in range(4):
        make_run(tmp_path, f"old-{index}", days_ago=100 - index)
    make_run(tmp_path, "young", days_ago=1)
    make_run(tmp_path, "alive", days_ago=200, status="running")
    make_run(tmp_path, "crowned", days_ago=300)
    make_champion(tmp_path, "nightly", "crowned")
    plan = plan_gc(tmp_path, keep_last=1, keep_days=7)
    assert plan.kept == {"crowned": "champion (nightly)", "alive": "running", "young": "one of the newest 1"}
    assert {Path(r.path).name for r in plan.removals} == {f"old-{i}" for i in range(4)}
    assert plan_gc(tmp_path, keep_last=10, keep_days=None).removals == []
    assert set(plan_gc(tmp_path, keep_last=0, keep_days=97.5).kept) == {"crowned", "alive", "young", "old-3"}


def test_dry_run_removes_nothing_and_a_real_run_removes_what_it_planned(tmp_path: Path) -> None:
    old = make_run(tmp_path, "old", days_ago=100)
    new = make_run(tmp_path, "new", days_ago=50)
    before = disk_usage([tmp_path])
    dry = collect_garbage(tmp_path, keep_last=1, keep_days=None, dry_run=True)
    assert dry.dry_run and [r.path for r in dry.removals] == [str(old)] and dry.freed_bytes > MB
    assert old.is_dir() and disk_usage([tmp_path]) == before
    assert "would remove run" in dry.format_text()
    done = collect_garbage(tmp_path, keep_last=1, keep_days=None)
    assert not done.dry_run and [r.path for r in done.removals] == [str(old)]
    assert not old.exists() and new.is_dir()
    assert before - disk_usage([tmp_path]) == done.freed_bytes == dry.freed_bytes
    assert json.loads(json.dumps(done.to_dict()))["removals"][0]["kind"] == "run"


def test_hard_links_are_counted_once_and_only_when_every_link_goes(tmp_path: Path) -> None:
    first = make_run(tmp_path, "first", days_ago=100)
    second = make_run(tmp_path, "second", days_ago=90, size=10)
    third = make_run(tmp_path, "third", days_ago=80, size=10)
    for run in (second, third):  # what a cached run does with the computing run's checkpoint
        link_or_copy(first / "checkpoints" / "best.pt", run / "checkpoints" / "best.pt")
        age(run)
    assert (second / "checkpoints" / "best.pt").stat().st_ino == (first / "checkpoints" / "best.pt").stat().st_ino
    assert MB < disk_usage([first, second, third]) < 2 * MB  # the checkpoint once
    assert freed_by([first]) < MB  # third still links it: removing first frees only its manifest
    assert freed_by([first, second, third]) > MB
    plan = plan_gc(tmp_path, keep_last=1, keep_days=None)  # third stays, holding the checkpoint
    assert {Path(r.path).name for r in plan.removals} == {"first", "second"} and plan.freed_bytes < MB


def test_busy_directories_and_named_runs_are_never_removed(tmp_path: Path) -> None:
    busy = make_run(tmp_path, "busy", days_ago=100)
    (busy / "manifest.json").touch()  # a run resuming right now rewrites its manifest
    make_run(tmp_path, "mine", days_ago=100)
    plan = plan_gc(tmp_path, keep_last=0, keep_days=None, keep={"mine"})
    assert plan.removals == [] and plan.kept["mine"] == "this run"
    assert plan.kept["busy"].startswith("modified in the last")


def test_orphaned_results_go_with_their_run_others_stay(tmp_path: Path) -> None:
    old = make_run(tmp_path, "old", days_ago=100)
    kept = make_run(tmp_path, "kept", days_ago=1)
    orphan, live = make_result(tmp_path, "k1", old), make_result(tmp_path, "k2", kept)
    unreadable = tmp_path / RESULTS_SUBDIR / "k3"
    unreadable.write_text("not a record")
    plan = collect_garbage(tmp_path, keep_last=1, keep_days=None, result_files=json_result_files)
    assert [(Path(r.path).name, r.kind) for r in plan.removals] == [("old", "run"), ("k1", "result")]
    assert not orphan.exists() and live.exists() and unreadable.exists()


@pytest.mark.parametrize(("keep_last", "keep_days"), [(-1, None), (None, -0.5)])
def test_negative_settings_are_one_line_errors(keep_last: int | None, keep_days: float | None) -> None:
    with pytest.raises(ConfigError, match=r"^Invalid --keep-(last|days) -[0-9.]+: expected a number >= 0"):
        check_retention(keep_last, keep_days)
