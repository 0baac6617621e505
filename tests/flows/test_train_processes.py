"""The training flow across processes (the CLI, against the session's Prefect API): two runs at
once sharing one cache, and a run killed mid-training then resumed by rerunning it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.caching import FlockLockManager
from tests.helpers import HEAVY_TASKS, cli_env, free_killed_holders_slots, tiny_config, train
from visionflow.fileio import file_sha256
from visionflow.manifest import Manifest
from visionflow.runs import list_runs

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.timeout(300)]


def train_command(config_file: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "train", "--config", str(config_file), *flags]


def write_config(tmp_path: Path, dataset: Path, output: Path, epochs: int) -> Path:
    values = tiny_config(dataset, output, **{"training.epochs": epochs}).model_dump(mode="json")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def start_until_first_checkpoint(config_file: Path, tmp_path: Path, run_dir: Path) -> subprocess.Popen:
    """`visionflow train` into `run_dir` in its own process group, returned once epoch 1's
    checkpoints are written (last.pt after best.pt): the run is then in epoch 2 or later."""
    proc = subprocess.Popen(
        train_command(config_file, "--run-name", run_dir.name),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("no checkpoint written in time")
        time.sleep(0.02)
    return proc


def test_two_concurrent_runs_share_the_cache_safely(tiny_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    config_file = write_config(tmp_path, tiny_data, output, epochs=1)
    procs = [
        subprocess.Popen(
            train_command(config_file),
            cwd=tmp_path,
            env=cli_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    rows = list_runs(output)
    assert len(rows) == 2 and len({row["name"] for row in rows}) == 2
    assert {row["status"] for row in rows} == {"completed"}
    manifests = [Manifest.load(row["path"]).model_dump(mode="json") for row in rows]
    for name in HEAVY_TASKS:  # each heavy step computed once, the other run waited and reused it
        assert sorted(m["tasks"][name] for m in manifests) == ["cached", "completed"], name
    best = [file_sha256(Path(row["path"]) / "checkpoints" / "best.pt") for row in rows]
    assert best[0] == best[1]
    locks = FlockLockManager(output / ".prefect-results" / "locks")
    assert not [p.stem for p in locks.directory.glob("*.lock") if locks.is_locked(p.stem)]


def test_killed_run_resumes_from_its_last_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    config_file = write_config(tmp_path, tiny_data, output, epochs=3)
    run_dir = output / "runs" / "crashy"
    proc = start_until_first_checkpoint(config_file, tmp_path, run_dir)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup, the training lock dies with it
    proc.wait()
    free_killed_holders_slots()  # its device slot: on a real server, its lease would expire
    interrupted = json.loads((run_dir / "manifest.json").read_text())
    assert interrupted["status"] == "running"
    # Its process is gone: the run history does not list a dead run as running.
    assert {row["name"]: row["status"] for row in list_runs(output)}["crashy"] == "interrupted"

    resumed = train(tiny_config(tiny_data, output, **{"training.epochs": 3, "output.run_name": "crashy"}))
    assert resumed["status"] == "completed" and resumed["run_name"] == "crashy"
    assert resumed["resumed_from"] == str(run_dir.resolve() / "checkpoints" / "last.pt")
    assert resumed["metrics"]["epochs_trained"] == 3
    assert resumed["tasks"]["train_model"] == "completed"

    uninterrupted = train(tiny_config(tiny_data, tmp_path / "fresh", **{"training.epochs": 3}))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]  # exact resume


def test_sigterm_marks_the_run_interrupted_and_a_rerun_resumes(tiny_data: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    config_file = write_config(tmp_path, tiny_data, output, epochs=3)
    run_dir = output / "runs" / "stopped"
    proc = start_until_first_checkpoint(config_file, tmp_path, run_dir)
    try:
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)  # what a process manager, `timeout` or a worker sends
        start = time.monotonic()
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 10
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        proc.wait()
    stopped = json.loads((run_dir / "manifest.json").read_text())
    assert stopped["status"] == "interrupted" and "SIGTERM" in stopped["error"] and stopped["finished_at"]
    assert {row["name"]: row["status"] for row in list_runs(output)}["stopped"] == "interrupted"

    resumed = train(tiny_config(tiny_data, output, **{"training.epochs": 3, "output.run_name": "stopped"}))
    assert resumed["status"] == "completed" and resumed["resumed_from"] == str(
        run_dir.resolve() / "checkpoints" / "last.pt"
    )
    uninterrupted = train(tiny_config(tiny_data, tmp_path / "fresh", **{"training.epochs": 3}))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
