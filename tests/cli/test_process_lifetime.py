"""Nothing a command starts outlives it (issue #29): `visionflow train` (stream loader workers),
a 2-rank torchrun `train` and a 2-worker `sweep`, each with the temporary Prefect server it starts
itself, killed with SIGKILL (the OOM killer, a lost node): the leader alone, or its whole process
group. Every process of the command is recorded while it runs (they all carry a marker in their
environment); 10 s after the kill none is alive. And a hangup (SIGHUP to the group: the terminal
closed) stops a run like Ctrl-C: exit 129, the manifest interrupted, and the rerun resumes to the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, copy_tiny_dataset, live_processes_with, start_in_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLASSES = ("bird", "frog", "truck")


def command_line(pid: int) -> str:
    """Its command line, cut to 160 characters ("(gone)" once it has exited)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "(gone)"


def start(tmp_path: Path, args: list[str], marker: str) -> subprocess.Popen:
    """`visionflow ARGS` in its own session, with a Prefect home of its own (so it starts its own
    temporary server) and `marker` (NAME=VALUE) in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    name, value = marker.split("=")
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO), **{name: value})
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return start_in_session([sys.executable, "-m", "flows.cli", *args], tmp_path, env, sigint_ignored=False)


def processes_until(proc: subprocess.Popen, marker: str, ready: Callable[[dict[int, str]], bool]) -> dict[int, str]:
    """Every process carrying `marker` (pid -> command line), collected while the command runs,
    once `ready` says enough."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 240
    while True:
        for pid in live_processes_with(marker):  # a fork shows its parent's command line until it execs
            if (command := command_line(pid)) != "(gone)":
                seen[pid] = command
        if ready(seen):
            return seen
        assert proc.poll() is None, f"ended ({proc.returncode}) before it was ready: {list(seen.values())}"
        assert time.monotonic() < deadline, f"not ready in time: {list(seen.values())}"
        time.sleep(0.05)


def killed_leaves_nothing(proc: subprocess.Popen, marker: str, seen: dict[int, str], whole_group: bool) -> None:
    """SIGKILL the command (or its process group); none of the processes seen is alive 10 s later."""
    os.killpg(proc.pid, signal.SIGKILL) if whole_group else proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while (alive := seen.keys() & set(live_processes_with(marker))) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive:  # leave nothing behind for the next test either
        os.kill(pid, signal.SIGKILL)
    assert not alive, [seen[pid] for pid in alive]


def count(seen: dict[int, str], what: str) -> int:
    return sum(what in command for command in seen.values())


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[str]:
    """NAME=VALUE in the environment of every process of the test's commands; what a failing test
    left running is killed after it."""
    marker = f"VISIONFLOW_TEST_RUN={tmp_path}"
    yield marker
    for pid in live_processes_with(marker):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def dataset(tmp_path: Path, sample_dataset: Path) -> Path:
    return copy_tiny_dataset(sample_dataset, tmp_path / "data", CLASSES, 8, 4)


def train_args(dataset: Path, output: Path, *flags: str) -> list[str]:
    return ["train", "--dataset", str(dataset), "--device", "cpu", "--output", str(output), *flags]


@pytest.mark.parametrize("whole_group", [False, True], ids=["leader", "group"])
def test_a_killed_train_leaves_nothing_running(tmp_path: Path, dataset: Path, marker: str, whole_group: bool) -> None:
    (tmp_path / "stream.yaml").write_text("data:\n  loader: stream\n  num_workers: 1\n")
    flags = ["--epochs", "1000", "--batch-size", "8", "--config", "stream.yaml", "--run-name", "stream"]
    proc = start(tmp_path, train_args(dataset, tmp_path / "out", *flags), marker)
    # Epoch 1 is over: the CLI, its server and the DataLoader worker (persistent) are running.
    last = tmp_path / "out" / "runs" / "stream" / "checkpoints" / "last.pt"
    seen = processes_until(proc, marker, lambda seen: count(seen, "prefect server start") and last.exists())
    assert count(seen, "-m flows.cli train") >= 2  # the worker: a fork of the CLI
    killed_leaves_nothing(proc, marker, seen, whole_group)


@pytest.mark.parametrize("whole_group", [False, True], ids=["leader", "group"])
def test_a_killed_torchrun_train_leaves_nothing_running(
    tmp_path: Path, dataset: Path, marker: str, whole_group: bool
) -> None:
    args = train_args(dataset, tmp_path / "out", "--epochs", "1000", "--batch-size", "8", "--nproc-per-node", "2")
    proc = start(tmp_path, args, marker)
    ranks = lambda seen: count(seen, "-u -m visionflow.train.ddp_worker")  # noqa: E731  (torchrun's has no -u)
    seen = processes_until(proc, marker, lambda seen: count(seen, "prefect server start") and ranks(seen) == 2)
    killed_leaves_nothing(proc, marker, seen, whole_group)


@pytest.mark.parametrize("whole_group", [False, True], ids=["leader", "group"])
def test_a_killed_sweep_leaves_nothing_running(tmp_path: Path, dataset: Path, marker: str, whole_group: bool) -> None:
    base = {"data": {"dataset": str(dataset), "batch_size": 8}, "training": {"epochs": 1000, "device": "cpu"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"optim.lr": [0.001, 0.002]}))
    args = ["sweep", "--config", "base.yaml", "--space", "space.yaml", "--parallel", "2", "--output", "out"]
    proc = start(tmp_path, args, marker)
    trials = lambda: list((tmp_path / "out" / "runs").glob("*/checkpoints/last.pt"))  # noqa: E731
    # Both trials are training, in the two Dask worker processes.
    workers = lambda seen: count(seen, "multiprocessing.spawn") == 2  # noqa: E731
    seen = processes_until(proc, marker, lambda seen: count(seen, "prefect server start") and workers(seen))
    processes_until(proc, marker, lambda _: len(trials()) == 2)
    killed_leaves_nothing(proc, marker, seen, whole_group)


def test_a_hangup_stops_the_run_and_the_rerun_resumes(tmp_path: Path, dataset: Path, marker: str) -> None:
    args = train_args(dataset, tmp_path / "out", "--epochs", "3", "--batch-size", "8", "--run-name", "hup")
    run_dir = tmp_path / "out" / "runs" / "hup"
    proc = start(tmp_path, args, marker)
    processes_until(proc, marker, lambda seen: (run_dir / "checkpoints" / "last.pt").exists())
    os.killpg(proc.pid, signal.SIGHUP)  # the terminal closed
    sent = time.monotonic()
    assert proc.wait(timeout=30) == 128 + signal.SIGHUP
    assert time.monotonic() - sent < 10
    stopped = json.loads((run_dir / "manifest.json").read_text())
    assert stopped["status"] == "interrupted" and "SIGHUP" in stopped["error"], stopped["error"]
    deadline = time.monotonic() + 10
    while live_processes_with(marker) and time.monotonic() < deadline:  # the server stops last
        time.sleep(0.1)
    assert live_processes_with(marker) == []

    weights = {}
    for output, flags in (("out", ["--run-name", "hup"]), ("fresh", [])):  # resumed, then never stopped
        args = train_args(dataset, tmp_path / output, "--epochs", "3", "--batch-size", "8", *flags)
        assert start(tmp_path, args, marker).wait(timeout=240) == 0
        (manifest,) = (tmp_path / output / "runs").glob("*/manifest.json")
        weights[output] = json.loads(manifest.read_text())["weights_sha256"]
    assert weights["out"] == weights["fresh"]
