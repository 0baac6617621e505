"""tasks/prefect_compat.py against the installed Prefect: each use of a Prefect internal does what
visionflow relies on, so an upgrade that changes one fails here, by name. And the result records
cached before the core sub-package move (tests/fixtures/written_by_0.1) still read, find their
files, and go through `visionflow gc`."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prefect import flow, task
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.context import FlowRunContext
from prefect.settings import Settings
from prefect.transactions import get_transaction, transaction
from prefect_dask import DaskTaskRunner

from tasks.caching import FlockLockManager, result_files
from tasks.prefect_compat import (
    LEASE_STORAGE,
    MOVED_MODULES,
    QuietHookLines,
    current_dask_scheduler,
    flow_run_result_store,
    no_enclosing_transaction,
    read_result_record,
    record_path,
    slots_taken,
)
from visionflow.retention import BUSY_SECONDS, RESULTS_SUBDIR, collect_garbage
from visionflow.train.records import FitResult

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "written_by_0.1"
WRITTEN_AT = "/tmp/fx/out"  # where the fixture's records were written (its README)


def test_no_enclosing_transaction_hides_the_current_one() -> None:
    with transaction() as outer:
        assert get_transaction() is outer
        with no_enclosing_transaction():
            assert get_transaction() is None
        assert get_transaction() is outer


@task(persist_result=True, cache_key_fn=lambda *_: "compat-key")
def answer() -> dict[str, int]:
    return {"answer": 42}


@flow
def store_flow(storage_dir: str) -> tuple[str, str]:
    with flow_run_result_store(Path(storage_dir), FlockLockManager(Path(storage_dir) / "locks")):
        store = FlowRunContext.get().result_store
        answer()
        return str(record_path(store, "compat-key")), type(store.lock_manager).__name__


def test_flow_run_result_store_keeps_records_where_asked_in_prefects_format(tmp_path: Path) -> None:
    """The re-entered flow run context reaches the flow's tasks; its records lie at `record_path`
    and `read_result_record` reads what Prefect wrote there."""
    record, lock_manager = store_flow(str(tmp_path))
    assert Path(record) == tmp_path / "compat-key" and lock_manager == "FlockLockManager"
    assert read_result_record(record) == {"answer": 42}


def test_flow_run_result_store_outside_a_flow_run_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="body of a flow run"):
        with flow_run_result_store(tmp_path, FlockLockManager(tmp_path)):
            pass


def _noted(*_: object) -> None:
    pass


@task(on_completion=[_noted])
def with_hook() -> None:
    pass


@flow
def hook_flow() -> None:
    with_hook()


def test_quiet_hook_lines_match_exactly_prefects_two_lines_for_the_hook(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="prefect.task_runs"):
        hook_flow()
    quiet = QuietHookLines(_noted.__name__)
    lines = [r for r in caplog.records if r.name == "prefect.task_runs" and "_noted" in r.getMessage()]
    assert [r.getMessage().split(" in response")[0] for r in lines] == [
        "Running hook '_noted'",
        "Hook '_noted' finished running successfully",
    ]
    assert not any(quiet.filter(r) for r in lines)
    error = logging.LogRecord("prefect.task_runs", logging.ERROR, "", 0, "An error ... hook '_noted'", None, None)
    assert quiet.filter(error)


def test_slots_taken_reads_http_423_from_the_cause() -> None:
    def refused(status: int) -> ConcurrencySlotAcquisitionError:
        request = httpx.Request("POST", "http://x/v2/concurrency_limits/increment")
        cause = httpx.HTTPStatusError("refused", request=request, response=httpx.Response(status, request=request))
        try:
            raise ConcurrencySlotAcquisitionError("Unable to acquire slots") from cause
        except ConcurrencySlotAcquisitionError as err:
            return err

    assert slots_taken(refused(423)) and not slots_taken(refused(404))
    assert not slots_taken(ConcurrencySlotAcquisitionError("no cause"))


def test_lease_storage_names_a_server_setting_and_a_module_with_a_lease_storage() -> None:
    ((variable, module),) = LEASE_STORAGE.items()
    assert variable == "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
    os.environ[variable] = module
    try:  # Prefect reads the variable into this setting, and loads the module's ConcurrencyLeaseStorage
        assert Settings().server.concurrency.lease_storage == module
    finally:
        del os.environ[variable]
    assert hasattr(importlib.import_module(module), "ConcurrencyLeaseStorage")


def test_moved_modules_table_matches_the_package() -> None:
    for old, new in MOVED_MODULES.items():
        assert importlib.util.find_spec(new) is not None, new
        spec = importlib.util.find_spec(old)  # gone, or the package that took its name (visionflow.data)
        assert spec is None or spec.submodule_search_locations, f"{old} is a module again: drop it from MOVED_MODULES"


def test_every_fixture_record_reads_and_finds_its_files() -> None:
    records = sorted(p for p in (FIXTURE / RESULTS_SUBDIR).iterdir() if p.is_file())
    assert len(records) == 9
    values = {type(read_result_record(p)).__name__: p for p in records}
    assert set(values) >= {"TrainOutput", "EvalOutput", "ExportOutput", "ValidatedData", "ModelInfo"}
    assert isinstance(read_result_record(values["TrainOutput"]).fit, FitResult)  # pickled as visionflow.records
    files = {p.name: result_files(p) for p in records}
    assert None not in files.values()
    referenced = {file.removeprefix(f"{WRITTEN_AT}/runs/") for found in files.values() for file in found}
    assert {"done/checkpoints/best.pt", "done/export/model.safetensors", "done/evaluation.json"} <= referenced
    assert {relpath.split("/")[0] for relpath in referenced} == {"done"}  # the interrupted run cached none


def copy_fixture(target: Path) -> Path:
    """The fixture's output directory copied to `target`, its runs aged past gc's BUSY_SECONDS."""
    shutil.copytree(FIXTURE, target)
    old = time.time() - 2 * BUSY_SECONDS
    for path in [*target.rglob("*"), target]:
        os.utime(path, (old, old))
    return target


def test_gc_removes_old_records_with_their_run(tmp_path: Path) -> None:
    """gc over the fixture's output: the records of the removed run go with it (its paths read as
    the copy's), those naming no run stay."""
    output = copy_fixture(tmp_path / "out")

    def moved_here(record: Path) -> list[str] | None:
        files = result_files(record)
        return None if files is None else [f.replace(WRITTEN_AT, str(output.resolve())) for f in files]

    plan = collect_garbage(output, keep_last=0, keep_days=0, result_files=moved_here)
    removed = {(Path(r.path).name, r.kind) for r in plan.removals}
    assert {("done", "run"), ("cut", "run")} <= removed
    results = [name for name, kind in removed if kind == "result"]
    assert len(results) == 6  # all but the three records that refer to no file
    assert sorted(p.name for p in (output / RESULTS_SUBDIR).iterdir() if p.is_file()) == sorted(
        p.name for p in (FIXTURE / RESULTS_SUBDIR).iterdir() if p.is_file() and p.name not in results
    )


def test_visionflow_gc_over_the_fixture_output_does_not_stumble_on_old_records(tmp_path: Path) -> None:
    output = copy_fixture(tmp_path / "out")
    argv = [sys.executable, "-m", "flows.cli", "gc", "--output", str(output), "--keep-last", "0", "--keep-days", "0"]
    done = subprocess.run(
        argv, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert not (output / "runs" / "done").exists() and not (output / "runs" / "cut").exists()
    # the records name /tmp/fx/out, not this copy: no run of theirs was removed here, so they stay
    assert len([p for p in (output / RESULTS_SUBDIR).iterdir() if p.is_file()]) == 9
    assert done.stdout.splitlines()[-1].startswith("removed 2 path(s)")


def _no_cluster() -> None:
    raise AssertionError("the runner made a cluster of its own")


@task
def worker_address() -> str:
    from distributed import get_worker

    return get_worker().address


@flow(task_runner=DaskTaskRunner(cluster_class=_no_cluster))
def on_scheduler(address: str) -> str:
    with current_dask_scheduler(address):
        return worker_address.submit().result()


def test_current_dask_scheduler_takes_a_flows_dask_task_runner_there() -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        assert on_scheduler(cluster.scheduler_address) in {worker.address for worker in cluster.workers.values()}
