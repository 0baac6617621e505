"""One device at a time, against a real `prefect server start` (its repossessor frees expired
leases; the session's test API runs no services): two `visionflow train` processes started at
once create the `device:cpu` limit once and train one after the other; a holder killed with
kill -9 frees its slots when its lease expires, and a later run then gets them; a cached
training neither waits for nor takes them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from prefect.exceptions import ObjectNotFound

from tests.flows.server_fixtures import PrefectServer, prefect_server
from tests.helpers import REPO, task_name, tiny_config, wait_for
from visionflow.manifest import Manifest
from visionflow.runs import list_runs
from visionflow.train.device_limits import LEASE_SECONDS

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(600)]

LIMIT = "device:cpu"
# The server looks for expired leases every second (default 15 s): the test waits less.
SERVER_SETTINGS = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"}
RUN_SECONDS = 300  # one CLI run to its end on a busy 2-core machine
LRS = (0.003, 0.002)  # the two runs started at once differ only in their learning rate


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    with prefect_server(tmp_path_factory.mktemp("device-limit-server"), settings=SERVER_SETTINGS) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: PrefectServer) -> Iterator[SyncPrefectClient]:
    with SyncPrefectClient(server.api_url) as prefect_client:
        yield prefect_client


@dataclass(frozen=True)
class Held:
    """A run's own record of its device, from its log lines (the client's clock): when it took the
    slot (logged once the server granted it), how ("at once" or "after waiting N s"), whether it
    logged that it found the device busy, and when it was releasing it (logged before the release)."""

    took: datetime
    how: str
    waited: bool
    releasing: datetime | None  # None: it never released it (killed)


def training_started(client: SyncPrefectClient, flow_run_id: str) -> datetime:
    """When the flow run's training task began to run, by the API (before it asked for the device)."""
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    (train,) = [run for run in runs if task_name(run) == "train_model"]
    return train.start_time


def write_config(path: Path, dataset: Path, output: Path, **overrides: object) -> Path:
    """A tiny CPU run (6 epochs: a few seconds of training) on a device:cpu limit of 1 slot when it
    creates it (on any machine one run at a time, whatever its cores and threads)."""
    values = {"training.epochs": 6, "training.device_slots": 1, **overrides}
    values = tiny_config(dataset, output, **values).model_dump(mode="json")
    path.write_text(yaml.safe_dump(values))
    return path


def start_train(server: PrefectServer, config_file: Path, cwd: Path) -> subprocess.Popen:
    """`visionflow train --config FILE` against the server, in its own session (to kill it whole),
    its output in FILE with the suffix .log."""
    with open(config_file.with_suffix(".log"), "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "train", "--config", str(config_file)],
            cwd=cwd,
            env={**server.env, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_sigint_default,
        )


def _sigint_default() -> None:
    """In the child, before exec: Ctrl-C raises KeyboardInterrupt, as in a terminal, even when
    pytest itself runs in the background of a shell (which ignores SIGINT, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def output_of(proc: subprocess.Popen) -> str:
    return Path(proc.args[-1]).with_suffix(".log").read_text()


def finish(proc: subprocess.Popen, timeout: float = RUN_SECONDS, code: int = 0) -> None:
    """Wait for the process to exit with `code` (killed and failing the test on a timeout)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"visionflow train still running after {timeout}s:\n{output_of(proc)[-3000:]}")
    assert proc.returncode == code, output_of(proc)[-3000:]


def logs(client: SyncPrefectClient, flow_run_id: str, until: str) -> list[tuple[datetime, str]]:
    """(timestamp, message) of a flow run's logs, its tasks' included, once one contains `until`
    (logs reach the API in the background)."""

    def read() -> list[tuple[datetime, str]]:
        found = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        return sorted((log.timestamp, log.message) for log in found)

    return wait_for(read, lambda lines: any(until in m for _, m in lines), 60, lambda lines: f"no {until!r} in {lines}")


def held(lines: list[tuple[datetime, str]]) -> Held:
    ((took, line),) = [(t, m) for t, m in lines if m.startswith(f"took 1 slot(s) of {LIMIT} ")]
    how = line.removeprefix(f"took 1 slot(s) of {LIMIT} ").partition(" (")[0]
    releasing = [t for t, m in lines if m == f"releasing 1 slot(s) of {LIMIT}"]
    waited = f"waiting for {LIMIT} (1 of 1 slots busy)" in [m for _, m in lines]
    return Held(took, how, waited, releasing[0] if releasing else None)


@pytest.fixture(scope="module")
def two_at_once(
    server: PrefectServer, client: SyncPrefectClient, tmp_path_factory: pytest.TempPathFactory, tiny_data: Path
) -> tuple[Path, list[Manifest]]:
    """Two runs of the same data into one output directory, started at once, that differ only in
    the learning rate: the data steps go in step (one computes, the other reuses, as soon as it is
    there), so both reach training within moments and contend for the device. Returns the
    directory and both manifests."""
    with pytest.raises(ObjectNotFound):  # a fresh server: the first training creates the limit
        client.read_global_concurrency_limit_by_name(LIMIT)
    root = tmp_path_factory.mktemp("two-at-once")
    output = root / "out"
    configs = [write_config(root / f"run{i}.yaml", tiny_data, output, **{"optim.lr": lr}) for i, lr in enumerate(LRS)]
    procs = [start_train(server, config, root) for config in configs]
    for proc in procs:
        finish(proc)
    return output, [Manifest.load(row["path"]) for row in list_runs(output)]


def test_two_runs_at_once_create_the_limit_once_and_train_one_after_the_other(
    two_at_once: tuple[Path, list[Manifest]], client: SyncPrefectClient
) -> None:
    """What the product guarantees, from each run's own record: the limit created once; the
    training intervals never overlap; the run that took the device first found it free; a run
    says it waited exactly when it found the device busy. (Whether the second run found it busy
    depends on timing, which the test does not guess from two clocks.)"""
    _, manifests = two_at_once
    assert sorted(m.status for m in manifests) == ["completed", "completed"]
    assert all(m.tasks["train_model"] == "completed" for m in manifests)  # both trained
    # Read once each run's last line about the device reached the API (logs are shipped in order).
    lines = [logs(client, m.prefect_flow_run_id, f"releasing 1 slot(s) of {LIMIT}") for m in manifests]
    (first, _), (second, later) = sorted(((held(run), m) for run, m in zip(lines, manifests)), key=lambda h: h[0].took)
    # What each side saw (pytest -s). The second's training task may start (by the API's clock)
    # before the first's release and still find the device free: its check comes later.
    started = training_started(client, later.prefect_flow_run_id)
    print(f"first: {first}\nsecond: {second}\nsecond's training task started {started}")
    # "releasing" is logged before the slot is released, "took" after the server granted it.
    assert first.releasing <= second.took, f"training intervals overlap: {first} and {second}"
    messages = [m for run in lines for _, m in run]
    assert messages.count(f"created concurrency limit {LIMIT} with 1 slots") == 1  # first use, once
    assert first.how == "at once" and not first.waited
    for run in (first, second):
        assert run.waited == run.how.startswith("after waiting "), run
    limit = client.read_global_concurrency_limit_by_name(LIMIT)
    assert (limit.limit, limit.active_slots) == (1, 0)


def test_a_killed_holders_slot_comes_free_when_its_lease_expires(
    two_at_once: tuple[Path, list[Manifest]],
    server: PrefectServer,
    client: SyncPrefectClient,
    tmp_path: Path,
    tiny_data: Path,
) -> None:
    """kill -9 of a run while it trains: its slot stays taken (nothing released it) until its lease
    expires, LEASE_SECONDS after the holder's last renewal; then the run that was waiting takes it.
    Meanwhile a rerun of a finished run, cached (another device_slots, not part of the training
    key), completes without waiting: a cached training takes no slot."""
    output, _ = two_at_once
    holder_config = write_config(
        tmp_path / "holder.yaml", tiny_data, output, **{"training.epochs": 5000, "optim.lr": 0.001}
    )
    holder = start_train(server, holder_config, tmp_path)
    try:
        wait_for(
            lambda: client.read_global_concurrency_limit_by_name(LIMIT).active_slots,
            lambda busy: busy == 1 or holder.poll() is not None,
            RUN_SECONDS,
            lambda busy: f"the holder never took the slot ({busy} busy)",
            interval=0.1,
        )
        taken = time.time()
        assert holder.poll() is None, output_of(holder)[-3000:]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # no cleanup: nothing releases the slot
        holder.wait()
    assert client.read_global_concurrency_limit_by_name(LIMIT).active_slots == 1
    later_config = write_config(tmp_path / "later.yaml", tiny_data, output, **{"optim.lr": 0.004})
    later = start_train(server, later_config, tmp_path)

    cached_config = write_config(
        tmp_path / "cached.yaml",
        tiny_data,
        output,
        **{"optim.lr": LRS[0], "training.device_slots": 2, "output.run_name": "cached-rerun"},
    )
    finish(start_train(server, cached_config, tmp_path))
    cached_done = time.time()
    rerun = Manifest.load(output / "runs" / "cached-rerun")
    assert rerun.status == "completed" and rerun.tasks["train_model"] == "cached"
    assert not [m for _, m in logs(client, rerun.prefect_flow_run_id, "Finished in state") if LIMIT in m]

    finish(later)
    run = next(m for m in (Manifest.load(row["path"]) for row in list_runs(output)) if m.config.optim.lr == 0.004)
    lines = logs(client, run.prefect_flow_run_id, f"releasing 1 slot(s) of {LIMIT}")
    record = held(lines)
    assert record.waited and record.how.startswith("after waiting "), record
    took = record.took.timestamp()
    assert cached_done < took, "the cached run finished only after the dead holder's slot came free"
    # Not before the lease ran out (renewed as the holder took the slot), soon after it (the
    # repossessor's 1 s loop, the waiting run's check every second, a loaded machine).
    assert LEASE_SECONDS - 5 <= took - taken <= LEASE_SECONDS + 30, took - taken
    assert client.read_global_concurrency_limit_by_name(LIMIT).active_slots == 0


def test_a_waiting_run_stops_at_once_on_ctrl_c(
    two_at_once: tuple[Path, list[Manifest]],
    server: PrefectServer,
    client: SyncPrefectClient,
    tmp_path: Path,
    tiny_data: Path,
) -> None:
    """Ctrl-C (SIGINT to the process group) of a run waiting for its device: it exits 130 within
    seconds, its run `interrupted`, having taken nothing (a request queued inside Prefect would
    have kept the process alive until the device came free)."""
    output, _ = two_at_once
    client.update_global_concurrency_limit(LIMIT, GlobalConcurrencyLimitUpdate(active_slots=1))  # a busy device
    try:
        config = write_config(
            tmp_path / "stopped.yaml", tiny_data, output, **{"optim.lr": 0.005, "output.run_name": "stopped"}
        )
        proc = start_train(server, config, tmp_path)
        try:
            wait_for(
                lambda: output_of(proc),
                lambda text: f"waiting for {LIMIT} (1 of 1 slots busy)" in text or proc.poll() is not None,
                RUN_SECONDS,
                lambda text: f"no waiting line:\n{text[-3000:]}",
            )
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)
            finish(proc, timeout=30, code=130)
            assert time.monotonic() - sent < 10
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert Manifest.load(output / "runs" / "stopped").status == "interrupted"
        assert client.read_global_concurrency_limit_by_name(LIMIT).active_slots == 1  # it took none
    finally:
        client.update_global_concurrency_limit(LIMIT, GlobalConcurrencyLimitUpdate(active_slots=0))
