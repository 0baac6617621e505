"""The training flow with two data-parallel ranks, through the CLI (`visionflow train
--nproc-per-node 2 --device cpu`, torchrun with gloo on 127.0.0.1) against the session's Prefect
API: SIGTERM stops every rank with it, the rerun resumes and completes one run (one manifest, one
last.pt/best.pt, one TensorBoard curve), and `visionflow evaluate` on its checkpoint reproduces
the manifest's metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tasks.artifacts import HISTORY_KEY, PROGRESS_KEY
from tests.helpers import (
    artifact_data,
    artifact_keys,
    cli_env,
    copy_tiny_dataset,
    log_messages,
    processes_mentioning,
    start_in_session,
    wait_until_gone,
)
from visionflow.checkpoints import load_checkpoint
from visionflow.runs import list_runs
from visionflow.train.launch import WORK_DIR

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.timeout(400)]
CLASSES = ("airplane", "automobile", "bird", "cat")
EPOCHS, BATCH = 40, 16  # 10 steps an epoch, ~0.1 s each on 2 idle cores: SIGTERM lands mid-training
STEPS_PER_EPOCH = 4 * 40 // BATCH


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, sample_dataset: Path) -> Path:
    """4 classes x (40 train + 4 val) images: epochs long enough to stop one midway."""
    return copy_tiny_dataset(sample_dataset, tmp_path_factory.mktemp("ddp-flow") / "data", CLASSES, 40, 4)


def test_two_rank_flow_stops_with_its_ranks_resumes_and_evaluates_like_its_manifest(data: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    command = [
        *(sys.executable, "-m", "flows.cli", "train", "--nproc-per-node", "2", "--device", "cpu"),
        *("--dataset", str(data), "--epochs", str(EPOCHS), "--batch-size", str(BATCH)),
        *("--output", str(output), "--run-name", "ddp"),
    ]
    run_dir = output / "runs" / "ddp"
    proc = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
        ranks = processes_mentioning(str(run_dir / WORK_DIR))  # torchrun and its 2 ranks
        assert len(ranks) == 3, ranks
        proc.send_signal(signal.SIGTERM)  # what a worker sends when the flow run is cancelled
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_until_gone(str(run_dir / WORK_DIR)) == []  # no rank outlives the flow run
    stopped = json.loads((run_dir / "manifest.json").read_text())
    assert stopped["status"] == "interrupted" and "SIGTERM" in stopped["error"]
    stopped_after = load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"]
    assert stopped_after < EPOCHS

    done = subprocess.run(command, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [row["name"] for row in list_runs(output)] == ["ddp"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed_from"].endswith("last.pt")
    assert manifest["distributed"] == {"backend": "gloo", "world_size": 2, "nnodes": 1, "devices": ["cpu", "cpu"]}
    assert manifest["metrics"]["epochs_trained"] == EPOCHS
    # Rank 0's events became the task's artifacts and log lines, as in a single-process run.
    flow_run = manifest["prefect_flow_run_id"]
    history = artifact_data(flow_run, HISTORY_KEY)  # the epochs before the resume included
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    assert PROGRESS_KEY in artifact_keys(flow_run)
    assert log_messages(flow_run, f"epoch {EPOCHS}/{EPOCHS} train_loss")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    curves = EventAccumulator(str(run_dir / "tensorboard"))
    curves.Reload()
    # One curve: the resumed rank 0 hid what the stopped one logged after last.pt. (The stopped one
    # may not have logged epoch `stopped_after` itself: SIGTERM can land between last.pt and the log.)
    steps = [e.step for e in curves.Scalars("loss/train")]
    resumed = [STEPS_PER_EPOCH * n for n in range(stopped_after + 1, EPOCHS + 1)]
    assert steps[-len(resumed) :] == resumed and steps == sorted(set(steps))
    assert set(steps) <= {STEPS_PER_EPOCH * n for n in range(1, EPOCHS + 1)}

    evaluated = subprocess.run(
        [
            *(sys.executable, "-m", "flows.cli", "evaluate", "--checkpoint", manifest["checkpoint"]["path"]),
            *("--dataset", str(data), "--data-dir", str(tmp_path), "--device", "cpu", "--json"),
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["accuracy"] == pytest.approx(manifest["metrics"]["eval_accuracy"])
    assert report["loss"] == pytest.approx(manifest["metrics"]["eval_loss"], rel=1e-4)


def test_ctrl_c_stops_a_two_rank_run_and_the_rerun_resumes_to_the_same_weights(data: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal (SIGINT to the process group; started as a script's background job, with
    SIGINT ignored) after epoch 1: exit 130 within 10 s, the manifest interrupted, no rank left
    (torchrun runs in a session of its own: the launcher stops it), and the rerun resumes to the
    weights of an uninterrupted 2-rank run."""

    def command(output: Path, *flags: str) -> list[str]:
        return [
            *(sys.executable, "-m", "flows.cli", "train", "--nproc-per-node", "2", "--device", "cpu"),
            *("--dataset", str(data), "--epochs", "3", "--batch-size", str(BATCH), "--output", str(output), *flags),
        ]

    run_dir = tmp_path / "out" / "runs" / "ddp"
    argv = command(tmp_path / "out", "--run-name", "ddp")
    proc = start_in_session(argv, tmp_path, cli_env(), stderr=subprocess.PIPE, sigint_ignored=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.02)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and time.monotonic() - sent < 10, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert wait_until_gone(str(run_dir / WORK_DIR)) == []
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "interrupted"
    weights = {}
    for output, flags in ((tmp_path / "out", ["--run-name", "ddp"]), (tmp_path / "fresh", [])):
        done = subprocess.run(command(output, *flags), cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        (manifest,) = (output / "runs").glob("*/manifest.json")
        weights[output.name] = json.loads(manifest.read_text())["weights_sha256"]
    assert weights["out"] == weights["fresh"]
