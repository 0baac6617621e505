"""`visionflow train` and `visionflow runs`: one-line errors with nothing written for bad input,
and a first run on a brand-new PREFECT_HOME (ephemeral API) that prints no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, copy_tiny_dataset, live_processes_with, run_main


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--epochs", "0"], "Invalid config field 'training.epochs'"),
        (
            ["--model", "vgg"],
            "Invalid model 'vgg' (did you mean vgg19, vgg16, vgg13?). Choose from: tudui, resnet18_cifar, ",
        ),
        (["--lr", "-1"], "Invalid config field 'optim.lr'"),
        (["--device", "tpu"], "Invalid config field 'training.device'"),
        (["--loader", "fast"], "Invalid config field 'data.loader': Input should be 'auto', 'memory' or 'stream'"),
    ],
)
def test_bad_value_is_one_line_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], expected: str
) -> None:
    code, out, err = run_main(capsys, "train", "--output", str(tmp_path / "out"), *flags)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_missing_dataset_is_one_line_and_writes_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "train", "--dataset", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "nowhere" in err and "no such folder" in err
    assert not (tmp_path / "out").exists()


def test_bad_config_file_value_names_the_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  image_size: 3\n")
    code, _, err = run_main(capsys, "train", "--config", str(config), "--output", str(tmp_path / "out"))
    assert code == 2 and "Invalid config field 'data.image_size'" in err and err.count("\n") == 1


def test_binary_config_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "model.pt"
    config.write_bytes(b"\x80\xa0\xff binary, not YAML")
    code, _, err = run_main(capsys, "train", "--config", str(config), "--output", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: Config file") and "model.pt" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_runs_on_an_empty_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_main(capsys, "runs", "--output", str(tmp_path), "--json")[:2] == (0, "[]\n")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_first_run_on_a_new_prefect_home(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, sample_dataset: Path
) -> None:
    data = copy_tiny_dataset(sample_dataset, tmp_path / "data", ("bird", "frog", "truck"), 6, 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # PREFECT_API_URL set but empty, as a shell "unset" often leaves it: the CLI treats it as unset.
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO), PREFECT_API_URL="")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "train",
            "--dataset",
            str(data),
            "--epochs",
            "1",
            "--batch-size",
            "9",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / "out"),
            "--run-name",
            "first",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    assert "Traceback" not in printed and "ERROR" not in printed
    assert "EventsWorker" not in printed
    run_dir = tmp_path / "out" / "runs" / "first"
    assert f"run directory: {run_dir}" in done.stdout
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in done.stdout
    assert "Prefect UI:" in done.stdout
    assert "epoch 1/1" in done.stderr  # the engine's progress line, also in the Prefect log

    code, out, _ = run_main(capsys, "runs", "--output", str(tmp_path / "out"), "--json")
    rows = json.loads(out)
    assert code == 0 and [(r["name"], r["status"], r["model"]) for r in rows] == [("first", "completed", "tudui")]
    assert 0.0 <= rows[0]["accuracy"] <= 1.0 and rows[0]["duration"] > 0
    code, out, _ = run_main(capsys, "runs", "--output", str(tmp_path / "out"))
    assert out.splitlines()[0].split() == ["name", "date", "data", "model", "accuracy", "duration", "status"]
    assert out.splitlines()[1].startswith("first ")

    # The identical command under a new name: every heavy step is a cache hit, and the process
    # never imports torch (the cached results hold torch-free records: visionflow.train.records).
    again = subprocess.run(
        done.args[:-1] + ["again"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280
    )
    assert again.returncode == 0, again.stdout + again.stderr
    manifest = json.loads((tmp_path / "out" / "runs" / "again" / "manifest.json").read_text())
    assert manifest["tasks"]["train_model"] == manifest["tasks"]["evaluate_checkpoint"] == "cached"
    assert "torch" not in manifest["packages"] and "torch" in manifest["versions"]
    assert manifest["metrics"] == json.loads((run_dir / "manifest.json").read_text())["metrics"]

    # The same name again: the run completed, so it is not reused.
    code, _, err = run_main(
        capsys, "train", "--dataset", str(data), "--output", str(tmp_path / "out"), "--run-name", "first"
    )
    assert code == 2 and "already completed" in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_auto_streams_over_a_tiny_memory_budget_and_records_it(tmp_path: Path, sample_dataset: Path) -> None:
    data = copy_tiny_dataset(sample_dataset, tmp_path / "mini", ("bird", "frog"), 6, 3)
    config = tmp_path / "config.yaml"
    config.write_text("data:\n  memory_budget_mb: 0.01\n  num_workers: 1\n")  # 18 images at 32 px: 0.05 MiB
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "flows.cli", "train", "--config", str(config), "--dataset", str(data)]
    argv += ["--epochs", "2", "--batch-size", "4", "--device", "cpu", "--run-name", "streamed"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = json.loads((tmp_path / "artifacts" / "runs" / "streamed" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["config"]["data"]["loader"] == "stream"
    assert 0.0 <= manifest["metrics"]["eval_accuracy"] <= 1.0
    assert not (tmp_path / "data").exists()  # no decoded cache (data.data_dir) was written


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "how, code, status",
    [
        ("ctrl-c", 130, "interrupted"),
        ("sigint", 130, "interrupted"),
        ("sigterm", 143, "interrupted"),
        ("timeout", 124, "timed_out"),
    ],
    ids=["ctrl-c", "sigint", "sigterm", "timeout"],
)
def test_a_run_stopped_from_outside_ends_cleanly(
    tmp_path: Path, sample_dataset: Path, how: str, code: int, status: str
) -> None:
    """Ctrl-C in a terminal (SIGINT to the process group), SIGINT to the process, SIGTERM, a
    training.timeout_minutes: the command exits with 130/143/124 within seconds, the manifest says
    interrupted or timed_out, and no process of the run is left, the temporary Prefect server
    included (it runs in its own session)."""
    data = copy_tiny_dataset(sample_dataset, tmp_path / "data", ("bird", "frog", "truck"), 6, 3)
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO))
    run_dir = tmp_path / "out" / "runs" / "stopped"
    argv = [sys.executable, "-m", "flows.cli", "train", "--dataset", str(data), "--epochs", "3", "--batch-size", "9",
            "--device", "cpu", "--output", str(tmp_path / "out"), "--run-name", "stopped"]  # fmt: skip
    if how == "timeout":  # 1.2 s of training; 3,000 epochs of 18 images take far longer on any CPU
        (tmp_path / "limit.yaml").write_text("training:\n  timeout_minutes: 0.02\n")
        argv[argv.index("3")] = "3000"
        argv += ["--config", str(tmp_path / "limit.yaml")]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        if how == "timeout":
            _, err = proc.communicate(timeout=240)
        else:
            deadline = time.monotonic() + 240
            while not (run_dir / "checkpoints" / "last.pt").exists():
                assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint written in time"
                time.sleep(0.02)
            sent = time.monotonic()
            if how == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the whole foreground group
            else:
                proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert time.monotonic() - sent < 10
        assert proc.returncode == code, err[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == status and "after epoch" in manifest["error"]
    assert err.strip().splitlines()[-1].startswith(f"{status}: rerun the same command with --run-name stopped")
    assert "Traceback" not in err
    assert live_processes_with(f"PREFECT_HOME={home}") == []  # the temporary server stopped with it
