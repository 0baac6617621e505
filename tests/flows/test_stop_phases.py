"""A stop in every phase of a run, for Ctrl-C in a terminal (SIGINT to the process group), SIGINT
to the process and SIGTERM (issue #25). The signal is sent from inside the run, by the Nth call of
the phase's function (tests/stop_driver.py), so it lands where the case says; the CLI starts as a
background job of a shell script does, with SIGINT ignored. Each case: exit 130/143 within 10 s of
the signal, the manifest `interrupted`, no process of the run left, and a rerun with the same
--run-name resumes to the weights of an uninterrupted run.

One class per signal: `make test` spreads classes over its workers (--dist loadscope)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.settings import PREFECT_API_URL

from tests.helpers import REPO, live_processes_with, start_in_session, tiny_config, train
from tests.stop_driver import SENT

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.timeout(300)]

EPOCHS, BATCH = 3, 8  # tiny_data: 32 train images, so 4 batches an epoch
PHASES = {  # phase -> (function of the core whose Nth call sends the signal, N)
    "data-steps": ("visionflow.steps:validate_into", 1),
    "first-batch": ("visionflow.train.engine:autocast", 1),  # as its forward pass starts
    "mid-epoch": ("visionflow.train.engine:Progress.update", 6),  # after epoch 2's second step
    "epoch-evaluation": ("visionflow.train.engine:collect_logits", 2),  # epoch 2's
    "checkpoint-write": ("visionflow.checkpoints:save_checkpoint", 3),  # epoch 2's first file
    "between-epochs": ("visionflow.tensorboard:TensorBoardCallback.on_epoch_end", 1),
    "final-evaluation": ("visionflow.steps:write_evaluation", 1),
    "export": ("visionflow.steps:export_into", 1),
    "publishing": ("visionflow.reports:run_summary_markdown", 1),
}


def config_values(dataset: Path, output: Path, **overrides: Any) -> Any:
    return tiny_config(dataset, output, **{"training.epochs": EPOCHS, "data.batch_size": BATCH, **overrides})


@pytest.fixture(scope="class")
def uninterrupted(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The weights of the same run, never stopped."""
    return train(config_values(tiny_data, tmp_path_factory.mktemp("uninterrupted")))["weights_sha256"]


def stop_in_phase(tiny_data: Path, tmp_path: Path, phase: str, signum: int, to_group: bool) -> tuple[int, str]:
    """Run `visionflow train` into tmp_path/out/runs/stopped with the signal sent in `phase`;
    (exit status, stderr). Asserts the exit within 10 s of the signal and no process left."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config_values(tiny_data, tmp_path / "out").model_dump(mode="json")))
    marker = f"VISIONFLOW_TEST_RUN={tmp_path}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    env["VISIONFLOW_TEST_RUN"] = str(tmp_path)
    target, call = PHASES[phase]
    driver = [sys.executable, "-m", "tests.stop_driver", target, str(call), signal.Signals(signum).name]
    argv = [*driver, "group" if to_group else "process", "train", "--config", str(config_file), "--run-name", "stopped"]
    proc = start_in_session(argv, tmp_path, env, stderr=subprocess.PIPE, sigint_ignored=True)
    try:
        _, err = proc.communicate(timeout=240)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    sent = [line for line in err.splitlines() if line.startswith(SENT)]
    assert sent, f"the signal was never sent (phase {phase} not reached): {err[-2000:]}"
    assert ended - float(sent[0].split()[-1]) < 10, err[-2000:]
    assert live_processes_with(marker) == []
    return proc.returncode, err


def check_stopped_and_resumed(
    tiny_data: Path, tmp_path: Path, code: int, err: str, expected: int, weights: str
) -> None:
    assert code == expected, err[-3000:]
    assert "Traceback" not in err
    run_dir = tmp_path / "out" / "runs" / "stopped"
    stopped = json.loads((run_dir / "manifest.json").read_text())
    assert stopped["status"] == "interrupted" and "after epoch" in stopped["error"], stopped["error"]
    assert err.strip().splitlines()[-1].startswith("interrupted: rerun the same command with --run-name stopped")
    resumed = train(config_values(tiny_data, tmp_path / "out", **{"output.run_name": "stopped"}))
    assert resumed["status"] == "completed" and resumed["run_name"] == "stopped"
    assert resumed["weights_sha256"] == weights


@pytest.mark.parametrize("phase", PHASES)
class TestCtrlCInATerminal:
    def test_a_stop_in_each_phase(self, tiny_data: Path, tmp_path: Path, phase: str, uninterrupted: str) -> None:
        code, err = stop_in_phase(tiny_data, tmp_path, phase, signal.SIGINT, to_group=True)
        check_stopped_and_resumed(tiny_data, tmp_path, code, err, 130, uninterrupted)


@pytest.mark.parametrize("phase", PHASES)
class TestSigintToTheProcess:
    def test_a_stop_in_each_phase(self, tiny_data: Path, tmp_path: Path, phase: str, uninterrupted: str) -> None:
        code, err = stop_in_phase(tiny_data, tmp_path, phase, signal.SIGINT, to_group=False)
        check_stopped_and_resumed(tiny_data, tmp_path, code, err, 130, uninterrupted)


@pytest.mark.parametrize("phase", PHASES)
class TestSigterm:
    def test_a_stop_in_each_phase(self, tiny_data: Path, tmp_path: Path, phase: str, uninterrupted: str) -> None:
        code, err = stop_in_phase(tiny_data, tmp_path, phase, signal.SIGTERM, to_group=False)
        check_stopped_and_resumed(tiny_data, tmp_path, code, err, 143, uninterrupted)
