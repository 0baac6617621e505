"""tasks/caching.py on a toy task: keys from the named inputs only, stale records become misses,
refresh, adoption of cached files into a new run directory, the flock lock manager, and the locks
of a flow run inside a cached task (as a sweep's trial runs the training flow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import flow

from tasks.caching import (
    FlockLockManager,
    TaskOutput,
    cached_task,
    durable_results,
    own_transactions,
    results_dir,
    written_files,
)
from visionflow.config import OutputConfig
from visionflow.retention import LOCKS_SUBDIR

CALLS: list[str] = []


class Written(TaskOutput):
    text: str


@cached_task("text")
def write_text(text: str, run_dir: str) -> Written:
    """Write `text` to out.txt in the run directory (records each real call)."""
    CALLS.append(text)
    with written_files(run_dir) as files:
        Path(run_dir, "out.txt").write_text(text)
    return Written(text=text, files=files)


@flow
def write_flow(text: str, output: str, run_dir: str, refresh: bool = False) -> tuple[Written, dict[str, str]]:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with durable_results(OutputConfig(output_dir=output, refresh=refresh)) as outcomes:
        result = write_text(text, run_dir)
    return result.adopted_into(run_dir), outcomes


def run(tmp_path: Path, name: str, text: str = "hello", refresh: bool = False) -> tuple[Written, str]:
    result, statuses = write_flow(text, str(tmp_path / "out"), str(tmp_path / "runs" / name), refresh)
    return result, statuses["write_text"]


def test_key_ignores_unnamed_inputs_and_cached_files_are_adopted(tmp_path: Path) -> None:
    first, status = run(tmp_path, "a")
    assert status == "completed"
    second, status = run(tmp_path, "b")  # another run_dir: not part of the key
    assert status == "cached"
    assert Path(second.files["out.txt"].path) == (tmp_path / "runs" / "b" / "out.txt").resolve()
    assert Path(second.files["out.txt"].path).read_text() == "hello"
    assert run(tmp_path, "c", text="other")[1] == "completed"
    assert (tmp_path / "out" / ".prefect-results").is_dir()


@pytest.mark.parametrize("damage", ["delete", "modify"])
def test_missing_or_changed_file_makes_a_miss(tmp_path: Path, damage: str) -> None:
    first, _ = run(tmp_path, "a")
    if damage == "delete":
        Path(first.files["out.txt"].path).unlink()
    else:
        Path(first.files["out.txt"].path).write_text("tampered")
    CALLS.clear()
    again, status = run(tmp_path, "b")
    assert status == "completed" and CALLS == ["hello"]
    assert Path(again.files["out.txt"].path).read_text() == "hello"
    assert run(tmp_path, "c")[1] == "cached"  # the recomputed record is valid again


def test_refresh_recomputes(tmp_path: Path) -> None:
    run(tmp_path, "a")
    assert run(tmp_path, "b", refresh=True)[1] == "completed"


def test_flock_locks_exclude_other_holders_and_die_with_their_process(tmp_path: Path) -> None:
    locks = FlockLockManager(tmp_path)
    assert locks.acquire_lock("k", "one") and locks.is_lock_holder("k", "one")
    other = FlockLockManager(tmp_path)  # another manager: a second open file, as in another run
    assert other.is_locked("k")
    assert not other.acquire_lock("k", "two", acquire_timeout=0.2)
    with pytest.raises(ValueError, match="No lock held by two"):
        locks.release_lock("k", "two")
    locks.release_lock("k", "one")
    assert not other.is_locked("k") and other.acquire_lock("k", "two", acquire_timeout=1)
    other.release_lock("k", "two")

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tasks.caching import FlockLockManager;"
            f"FlockLockManager({str(tmp_path)!r}).acquire_lock('k', 'child');"
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert locks.is_locked("k")
    finally:
        holder.kill()
        holder.wait()
    start = time.monotonic()
    assert locks.acquire_lock("k", "one", acquire_timeout=5) and time.monotonic() - start < 5


def held_locks(output: str) -> list[str]:
    """The result keys whose lock an open file holds (this process's included)."""
    locks = FlockLockManager(results_dir(output) / LOCKS_SUBDIR)  # a fresh manager: holds nothing itself
    return [path.stem for path in sorted(locks.directory.glob("*.lock")) if locks.is_locked(path.stem)]


HELD_AFTER_INNER_FLOW: list[list[str]] = []


@cached_task("text", "fail")
def flow_in_a_task(text: str, output: str, run_dir: str, fail: bool) -> Written:
    """A cached task running a flow of cached tasks, then failing if asked (a diverging trial)."""
    with own_transactions():
        written, _ = write_flow(text, output, run_dir)
    HELD_AFTER_INNER_FLOW.append(held_locks(output))
    if fail:
        raise ValueError("failed after its flow")
    return written


@flow
def outer_flow(text: str, output: str, run_dir: str, fail: bool) -> bool:
    """Whether the task failed."""
    with durable_results(OutputConfig(output_dir=output)):
        return flow_in_a_task(text, output, run_dir, fail, return_state=True).is_failed()


@pytest.mark.parametrize("fail", [False, True], ids=["completed", "failed"])
def test_a_flow_in_a_cached_task_releases_each_lock_when_its_task_ends(tmp_path: Path, fail: bool) -> None:
    # Without own_transactions the inner tasks' transactions are children of the outer task's: a
    # child's lock is held until the outer task ends, and when it fails, the lock of a child that
    # was a cache hit is never released (Prefect's rollback skips committed children): the next
    # run needing that result waits for it forever.
    output = str(tmp_path / "out")
    run(tmp_path, "first")  # write_text's result is stored: a cache hit inside the task below
    HELD_AFTER_INNER_FLOW.clear()
    assert outer_flow("hello", output, str(tmp_path / "runs" / "inner"), fail) is fail
    assert held_locks(output) == []
    (held_inside,) = HELD_AFTER_INNER_FLOW
    assert len(held_inside) == 1  # the outer task's own lock only


KEY_SCRIPT = """
import visionflow
from tasks.caching import task_cache_key
from tasks.data import DatasetRef, Normalization, ValidatedData
from tasks.training import train_model
from visionflow.config import DataConfig, PipelineConfig

inputs = {"dataset": DatasetRef(data=DataConfig(), root="/data", fingerprint="f" * 64, classes=("a", "b")),
          "validated": ValidatedData(excluded=(), fingerprint="e" * 64, num_train=8, num_eval=4, eval_split="val"),
          "config": PipelineConfig().resolved(), "normalization": Normalization(mean=[0.5] * 3, std=[0.25] * 3)}
print(visionflow.__file__)
print(task_cache_key(train_model, inputs, train_model.cache_policy.inputs))
"""


def test_key_covers_every_core_module(tmp_path: Path) -> None:
    """Editing a core module that the training task never imports itself (data/images.py decodes
    the tensor cache that training reads) changes the training task's key."""
    repo = Path(__file__).resolve().parents[2]
    assert "visionflow.data.images" not in (repo / "tasks" / "training.py").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(repo / "visionflow", copy / "visionflow", ignore=shutil.ignore_patterns("__pycache__"))

    def key() -> str:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), str(repo)])}
        out = subprocess.run(
            [sys.executable, "-c", KEY_SCRIPT],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.split()
        assert Path(out[0]).resolve() == (copy / "visionflow" / "__init__.py").resolve()  # the copy is what ran
        return out[1]

    before = key()
    assert key() == before  # stable while nothing changes
    images = copy / "visionflow" / "data" / "images.py"
    images.write_text(images.read_text() + "\n# a change in decoding\n")
    assert key() != before
