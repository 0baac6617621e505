"""Bounded disk end to end: an identical rerun adds under 1 MB (its files are hard links of the
first run's), `visionflow gc` removes an old run and its cached results, and a later identical
run still completes; the flow's own gc (output.keep_last / keep_days) never removes its run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from flows.cli import main
from tests.helpers import HEAVY_TASKS, run_dir_of, tiny_config, train
from visionflow.retention import BUSY_SECONDS, RESULTS_SUBDIR, disk_usage

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.timeout(300)]

LINKED = ("checkpoints/best.pt", "checkpoints/last.pt", "export/model.safetensors")


def inodes(paths: list[Path]) -> set[tuple[int, int]]:
    return {(s.st_dev, s.st_ino) for root in paths for p in root.rglob("*") if p.is_file() and (s := p.stat())}


def new_bytes(run_dir: Path, others: list[Path]) -> int:
    """What `run_dir` adds to disk beside `others`: its files whose inode no other path holds, each once."""
    shared = inodes(others)
    unique = {(s.st_dev, s.st_ino): s.st_size for p in run_dir.rglob("*") if p.is_file() and (s := p.stat())}
    return sum(size for key, size in unique.items() if key not in shared)


def age(run_dir: Path) -> None:
    """Make a finished run look older than BUSY_SECONDS (gc never touches a directory in use)."""
    old = time.time() - 2 * BUSY_SECONDS
    for path in (run_dir / "manifest.json", run_dir):
        os.utime(path, (old, old))


def test_identical_rerun_links_its_files_and_gc_keeps_later_runs_working(tiny_data: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_data, tmp_path)
    first = train(config)
    second = train(config)
    assert {second["tasks"][name] for name in HEAVY_TASKS} == {"cached"}
    a, b = run_dir_of(first), run_dir_of(second)
    added = new_bytes(b, [a, tmp_path / "data"])
    print(f"\nsecond identical run: {added} bytes new on disk (as copies: {disk_usage([b])} bytes)")
    assert added < 1_000_000
    for relpath in LINKED:
        assert (b / relpath).stat().st_ino == (a / relpath).stat().st_ino, relpath
    records = sorted(p.name for p in (tmp_path / RESULTS_SUBDIR).iterdir() if p.is_file())

    age(a)
    assert main(["gc", "--output", str(tmp_path), "--keep-last", "1", "--keep-days", "0"]) == 0
    assert not a.exists() and b.is_dir()
    after_gc = sorted(p.name for p in (tmp_path / RESULTS_SUBDIR).iterdir() if p.is_file())
    assert len(after_gc) < len(records)  # the records that named the first run went with it
    for relpath in LINKED:
        assert (b / relpath).is_file()  # the second run's links outlive the first run

    age(b)
    third = train(tiny_config(tiny_data, tmp_path, **{"output.keep_last": 0, "output.keep_days": 0}))
    assert third["status"] == "completed" and third["weights_sha256"] == first["weights_sha256"]
    assert set(third["tasks"].values()) <= {"completed", "cached"}
    # Its own gc removed the aged second run, never itself.
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [third["run_name"]]
