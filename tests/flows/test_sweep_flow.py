"""The sweep flow on real Dask clusters and the session's Prefect API: a 4-trial grid on a local
cluster of 2 worker processes (ranked by the metric, each trial an ordinary run whose weights equal
a single train, a cached rerun); the CLI against a scheduler and workers started as processes, with
a diverging trial."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
)
from prefect.settings import PREFECT_API_URL

from tests.helpers import FINAL_STATES, REPO, free_killed_holders_slots, log_messages, task_name, tiny_config
from visionflow.config import PipelineConfig
from visionflow.cores import usable_cores
from visionflow.manifest import Manifest
from visionflow.sweep import SweepConfig, SweepResult, best_config_yaml, leaderboard_key, trial_threads
from visionflow.train.device_limits import DEVICE_LIMIT_PREFIX

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow, pytest.mark.timeout(600)]

GRID = {"optim.lr": [0.001, 0.01], "training.seed": [0, 1]}
SLOT = "sweep-best"
DASK_LOG = "dask.log"


def base_config(tiny_data: Path, output: Path) -> PipelineConfig:
    # SGD without a schedule on batches of 4 (8 steps an epoch): lr 10 diverges within the epoch.
    # fp32 and contiguous layout: no per-machine measurement (autotune) inside the trials.
    return tiny_config(
        tiny_data,
        output,
        **{
            "data.batch_size": 4,
            "optim.optimizer": "sgd",
            "optim.scheduler": "none",
            "training.precision": "fp32",
            "training.channels_last": False,
        },
    )


def run_sweep(base: PipelineConfig, sweep: SweepConfig) -> tuple[SweepResult, str]:
    from flows.sweep import sweep_pipeline

    state = sweep_pipeline(base, sweep, return_state=True)
    assert state.is_completed(), state.message
    return state.result(), str(state.state_details.flow_run_id)


def training_flow_runs(names: list[str]) -> list[Any]:
    """The training flow runs named after trials (each trial task starts one, on a Dask worker)."""
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))


def trial_task_states(flow_run_id: str, timeout: float = 30.0) -> list[str]:
    """The final states of a sweep's trial task runs, read through the API (states arrive as events)."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states = sorted(run.state.name for run in runs if task_name(run) == "run_trial" and run.state is not None)
            if set(states) <= FINAL_STATES or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


def latest_table(key: str) -> list[dict[str, Any]]:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return json.loads(artifact.data)


@pytest.fixture(scope="module", autouse=True)
def restored_environment() -> Iterator[None]:
    """Dask's nanny sets OMP_NUM_THREADS=1 (and MKL's and OpenBLAS's) in the environment of the
    process that starts a local cluster, and leaves them there: restore the environment after this
    module, or later tests' CLI subprocesses would train on one thread where the tests train on all."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep")


@pytest.fixture(scope="module")
def grid(tiny_data: Path, output: Path) -> tuple[SweepResult, str, PipelineConfig, SweepConfig]:
    base = base_config(tiny_data, output).model_copy(deep=True)
    base.output.champion = SLOT  # the best trial challenges it
    sweep = SweepConfig(space=GRID, parallel=2, name="grid")
    result, flow_run_id = run_sweep(base, sweep)
    return result, flow_run_id, base, sweep


def test_grid_ranks_four_trials_by_the_metric(grid: tuple[SweepResult, str, PipelineConfig, SweepConfig]) -> None:
    result, flow_run_id, _, _ = grid
    assert result.metric == "eval_accuracy"
    assert [row.state for row in result.rows] == ["completed"] * 4
    metrics = [row.metric for row in result.rows]
    assert metrics == sorted(metrics, reverse=True)
    assert {tuple(sorted(row.params.items())) for row in result.rows} == {
        (("optim.lr", lr), ("training.seed", seed)) for lr in GRID["optim.lr"] for seed in GRID["training.seed"]
    }
    assert result.best == result.rows[0].trial
    # the best trial challenged the (empty) champion slot, through the champion logic
    assert result.champion.outcome == "promoted" and result.champion.challenger_run == result.best
    assert Manifest.load(result.rows[0].run_dir).champion.slot == SLOT
    # the table artifact: the same ranking, one column per varied field
    table = latest_table(leaderboard_key(result.name))
    assert [row["trial"] for row in table] == [row.trial for row in result.rows]
    assert [row["rank"] for row in table] == [1, 2, 3, 4]
    assert {"optim.lr", "training.seed", "eval_accuracy", "eval_loss", "weights_sha256", "run_dir"} <= set(table[0])
    # each trial is a training flow run of its own, started by its trial task (on a Dask worker)
    names = [row.trial for row in result.rows]
    assert sorted(run.name for run in training_flow_runs(names)) == sorted(names)


def test_each_trial_is_an_ordinary_run(grid: tuple[SweepResult, str, PipelineConfig, SweepConfig]) -> None:
    result, _, _, _ = grid
    for row in result.rows:
        run_dir = Path(row.run_dir)
        manifest = Manifest.load(run_dir)
        assert manifest.status == "completed" and manifest.weights_sha256 == row.weights_sha256
        assert manifest.config.optim.lr == row.params["optim.lr"]
        assert manifest.config.training.seed == row.params["training.seed"]
        for relpath in ("checkpoints/best.pt", "export/model.safetensors", "evaluation.json", "validation.json"):
            assert (run_dir / relpath).is_file(), relpath
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # hparams of every trial under one log dir, and the leaderboard beside them
    sweep_dir = Path(result.sweep_dir)
    assert sorted(p.name for p in (sweep_dir / "tensorboard").iterdir()) == sorted(r.trial for r in result.rows)
    saved = json.loads((sweep_dir / "leaderboard.json").read_text())
    assert [row["trial"] for row in saved["rows"]] == [row.trial for row in result.rows]


def test_parallel_trials_fit_side_by_side_in_the_cpu_limit(
    grid: tuple[SweepResult, str, PipelineConfig, SweepConfig],
) -> None:
    """Each trial's training takes the cores it trains on (`trial_threads(parallel)`) of
    device:cpu, whose default size is the usable cores: the `parallel` trials fit side by side,
    none waits for another."""
    result, _, _, sweep = grid
    cpu = f"{DEVICE_LIMIT_PREFIX}cpu"
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(cpu)
    assert limit.limit == usable_cores() and limit.active_slots == 0
    share = trial_threads(sweep.parallel)
    assert sweep.parallel * share <= limit.limit
    for run in training_flow_runs([row.trial for row in result.rows]):
        lines = log_messages(str(run.id), cpu, until=f"releasing {share} slot(s) of {cpu}")
        assert [line for line in lines if line.startswith("took")] == [
            f"took {share} slot(s) of {cpu} at once (lease 60 s, renewed while training)"
        ]
        assert not [line for line in lines if line.startswith("waiting")], lines


def test_trial_weights_equal_a_single_train_on_one_thread(
    grid: tuple[SweepResult, str, PipelineConfig, SweepConfig], tmp_path: Path
) -> None:
    # One trial stands for all four: they run the same task on the same kind of worker, and the
    # grid test shows each trained its own values. 2 workers on this 2-core machine: 1 thread each.
    result, _, _, _ = grid
    best = Manifest.load(result.rows[0].run_dir)
    config_file = tmp_path / "best.yaml"
    config_file.write_text(best_config_yaml(best))
    threads = trial_threads(2)  # what each of the 2 workers' trials used
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the single run
    argv = ["train", "--config", str(config_file), "--run-name", "single", "--refresh"]  # refresh: train again
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    single = Manifest.load(Path(best.config.output.output_dir) / "runs" / "single")
    assert single.tasks["train_model"] == "completed"
    assert single.weights_sha256 == best.weights_sha256


def test_rerun_reports_every_trial_cached_and_trains_nothing(
    grid: tuple[SweepResult, str, PipelineConfig, SweepConfig],
) -> None:
    first, _, base, sweep = grid
    again, flow_run_id = run_sweep(base, sweep)
    assert [row.state for row in again.rows] == ["cached"] * 4
    assert [(row.trial, row.weights_sha256) for row in again.rows] == [
        (row.trial, row.weights_sha256) for row in first.rows
    ]
    assert len(training_flow_runs([row.trial for row in again.rows])) == 4  # the first sweep's: none started
    assert trial_task_states(flow_run_id) == ["Cached"] * 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """A Dask scheduler and a worker (2 processes, 1 thread each) started as separate processes on
    127.0.0.1, logging to DASK_LOG in tmp_path; yields the scheduler's address once both workers
    joined; stops them after."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the workers import flows.sweep
    log = (tmp_path / DASK_LOG).open("w")  # the scheduler's and workers' (trials' logs included)
    common = {"cwd": tmp_path, "env": env, "stdout": log, "stderr": subprocess.STDOUT}
    scheduler_argv = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]]
    worker_argv = ["distributed.cli.dask_worker", address, "--nworkers", "2", "--nthreads", "1"]
    processes = [
        subprocess.Popen([sys.executable, "-m", *scheduler_argv, "--no-dashboard"], **common),
        subprocess.Popen([sys.executable, "-m", *worker_argv, "--no-dashboard"], **common),
    ]
    try:
        with Client(address, timeout=60) as client:  # waits for the scheduler
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        log.close()


def test_cli_sweep_on_an_existing_dask_cluster_with_a_diverging_trial(
    tiny_data: Path, tmp_path: Path, dask_cluster: str
) -> None:
    base = base_config(tiny_data, tmp_path / "out")
    (config_file := tmp_path / "base.yaml").write_text(yaml.safe_dump(base.model_dump(mode="json")))
    (space_file := tmp_path / "space.yaml").write_text("optim.lr: [0.01, 10.0]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    argv = ["sweep", "--config", str(config_file), "--space", str(space_file), "--dask-address", dask_cluster]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *argv, "--name", "remote", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:] + (tmp_path / DASK_LOG).read_text()[-3000:]
    result = SweepResult.model_validate_json(done.stdout)
    good, bad = result.rows
    assert good.state == "completed" and good.params == {"optim.lr": 0.01} and good.metric is not None
    assert Manifest.load(good.run_dir).status == "completed"
    # the diverging trial is a failed row with its reason, and a failed run
    assert bad.state == "failed" and bad.params == {"optim.lr": 10.0} and bad.metric is None
    assert "Training diverged in epoch 1" in bad.error
    assert Manifest.load(bad.run_dir).status == "failed"
    table = latest_table(leaderboard_key("remote"))
    assert [row["rank"] for row in table] == [1, "-"]
    assert table[1]["state"].startswith("failed: Training diverged")


def test_a_sweep_killed_midway_reruns_only_the_unfinished_trial(tiny_data: Path, tmp_path: Path) -> None:
    # One worker, two trials one after the other: the second (60 epochs, ~3 s on this data on an
    # idle machine, longer on a busy one: a wide margin over the 0.2 s from the first row to the
    # stop) is still training when the first one's leaderboard row appears, and the sweep is
    # stopped there (SIGTERM, as a process manager or `timeout` would).
    base = base_config(tiny_data, tmp_path / "out")
    (config_file := tmp_path / "base.yaml").write_text(yaml.safe_dump(base.model_dump(mode="json")))
    (space_file := tmp_path / "space.yaml").write_text("training.epochs: [1, 60]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value()}
    argv = [sys.executable, "-m", "flows.cli", "sweep", "--config", str(config_file), "--space", str(space_file)]
    argv += ["--parallel", "1", "--name", "killed", "--json"]
    leaderboard = tmp_path / "out" / "sweeps" / "killed" / "leaderboard.json"
    common = {"cwd": tmp_path, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    with subprocess.Popen(argv, **common) as first:
        deadline = time.monotonic() + 240
        while not (leaderboard.is_file() and json.loads(leaderboard.read_text())["rows"]):
            assert first.poll() is None and time.monotonic() < deadline, "no trial finished"
            time.sleep(0.2)
        first.terminate()
        first.communicate(timeout=120)
    assert first.returncode == 143
    free_killed_holders_slots()  # the stopped trial's worker process ended without releasing its device slot
    (done,) = json.loads(leaderboard.read_text())["rows"]
    done_trial = done["trial"]
    rerun = subprocess.run(argv, **common, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = SweepResult.model_validate_json(rerun.stdout)
    assert {row.trial: row.state for row in result.rows} == {
        done_trial: "cached",
        next(row.trial for row in result.rows if row.trial != done_trial): "completed",
    }
    unfinished = next(row for row in result.rows if row.trial != done_trial)
    manifest = Manifest.load(unfinished.run_dir)
    assert manifest.status == "completed" and manifest.metrics.epochs_trained == unfinished.params["training.epochs"]
