"""Every use of Prefect internals (and prefect-dask's), in one place: private attributes, internal
modules, the wording of its log lines, its on-disk result format, a runner's undocumented path,
a server behaviour worked around. Each has a test (in tests/tasks/test_prefect_compat.py, or named
beside it) that fails when an upgrade changes what it relies on; the rest of visionflow uses
Prefect's public API only.

Prefect is imported inside the functions: flows/prefect_server.py reads `LEASE_STORAGE` before a
command has chosen its API, and Prefect reads PREFECT_API_URL once, at import.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
    from prefect.locking.protocol import LockManager
    from prefect.results import ResultStore


def reopen_expired_pause(flow_run_id: Any) -> None:
    """Set a flow run Running again after its pause timed out. The server's behaviour this works
    around is not documented: it refuses every later state to a run whose pause expired (even
    Completed: it fails the run instead), so only a forced state lets the run go on. Tested by
    tests/flows/test_approval.py (the timeout case: kept, and the run Completed)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(), force=True)


# A server-internal module path, given as a setting: where the server keeps the leases of
# concurrency slots (on disk in the Prefect home, so a restarted server still frees a slot whose
# holder died). flows/prefect_server.py sets it for every server visionflow starts.
LEASE_STORAGE = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}

# Modules moved since results were cached (the core sub-package move), old name -> new name: a
# cached result pickles its classes by module name.
MOVED_MODULES = {
    **{
        f"visionflow.{old}": f"visionflow.data.{new}"
        for old, new in {
            "data": "splits",
            "download": "download",
            "images": "images",
            "fingerprint": "fingerprint",
            "validate": "validate",
            "near_duplicates": "near_duplicates",
            "datachanges": "changes",
            "cache": "decoded",
            "loaders": "loaders",
            "transforms": "transforms",
            "preview": "preview",
            "datasets": "folders",
        }.items()
    },
    **{
        f"visionflow.{name}": f"visionflow.train.{name}"
        for name in (
            "engine",
            "records",
            "optim",
            "rng",
            "stopping",
            "device",
            "autotune",
            "distributed",
            "launch",
            "ddp_worker",
            "device_limits",
        )
    },
}


# ---------------------------------------------------------------------------------------------
# Transactions and the flow run context


@contextmanager
def no_enclosing_transaction() -> Iterator[None]:
    """Inside the block, Prefect sees no enclosing transaction (`get_transaction()` is None), so
    the task runs started there commit on their own instead of as children of the current one.
    Prefect has no public way to do this: it sets the private `BaseTransaction.__var__`."""
    from prefect.transactions import BaseTransaction

    token = BaseTransaction.__var__.set(None)
    try:
        yield
    finally:
        BaseTransaction.__var__.reset(token)


@contextmanager
def flow_run_result_store(storage_dir: Path, lock_manager: LockManager) -> Iterator[None]:
    """Inside the body of a flow run: its result store (which tasks without storage of their own
    use) keeps records in `storage_dir`, locked by `lock_manager`, for the rest of the block. The
    storage is chosen at run time (it is under the config's output directory), which a flow's
    `result_storage=` cannot do: a copy of the flow run context, re-entered. The copy is also what
    Prefect serializes for task runs in other processes (a Dask worker)."""
    from prefect.context import FlowRunContext
    from prefect.filesystems import LocalFileSystem

    context = FlowRunContext.get()
    if context is None:
        raise RuntimeError("flow_run_result_store() is for the body of a flow run")
    store = context.result_store.model_copy(
        update={"result_storage": LocalFileSystem(basepath=str(storage_dir)), "lock_manager": lock_manager}
    )
    with context.model_copy(update={"result_store": store}):
        yield


# ---------------------------------------------------------------------------------------------
# Result records: Prefect's on-disk format


def record_path(store: ResultStore, key: str) -> Path | None:
    """Where the record of `key` lies: a LocalFileSystem store keeps it as the file `<basepath>/<key>`
    (None for any other storage)."""
    from prefect.filesystems import LocalFileSystem

    storage = store.result_storage
    return Path(storage.basepath) / key if isinstance(storage, LocalFileSystem) else None


class _MovedModulesUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(MOVED_MODULES.get(module, module), name)


def read_result_record(path: Path | str) -> Any:
    """The value a result record file holds, as Prefect writes it with its default serializer
    (JSON whose "result" is the base64 of a cloudpickle, `metadata.serializer.type` "pickle"),
    classes of moved modules found at their new place (MOVED_MODULES). ValueError for a file that
    is not such a record; the unpickler's errors for a value whose classes cannot be found."""
    try:
        record = json.loads(Path(path).read_bytes())
        serializer = record["metadata"]["serializer"]["type"]
        blob = base64.b64decode(record["result"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a Prefect result record: {err}") from err
    if serializer != "pickle":
        raise ValueError(f"Unsupported result serializer {serializer!r} in {path}: expected 'pickle'")
    return _MovedModulesUnpickler(io.BytesIO(blob)).load()


# ---------------------------------------------------------------------------------------------
# Log lines and errors


class QuietHookLines(logging.Filter):
    """Leaves out the two INFO lines Prefect logs around each run of the state hook named `hook`
    ("Running hook 'x' in response to entering state ...", "Hook 'x' finished running
    successfully"); a failing hook's ERROR line stays. Prefect has no setting for them: this
    matches their wording."""

    def __init__(self, hook: str) -> None:
        super().__init__()
        self.marker = f"hook {hook!r}"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and self.marker in record.getMessage().lower())


def slots_taken(error: ConcurrencySlotAcquisitionError) -> bool:
    """Whether the server refused concurrency slots because they are taken (HTTP 423 Locked), not
    for another reason: Prefect raises the same error for both, the HTTP error as its `__cause__`."""
    import httpx

    cause = error.__cause__
    return isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == httpx.codes.LOCKED


# ---------------------------------------------------------------------------------------------
# prefect-dask


@contextmanager
def current_dask_scheduler(address: str | None) -> Iterator[None]:
    """Inside the block, a flow's DaskTaskRunner submits to the Dask scheduler at `address` (None or
    empty: to the cluster it makes itself). A flow's task runner is fixed when the flow is defined; before
    it makes a cluster at the first submit, prefect-dask's runner connects to the scheduler of the
    current default Dask client, if there is one: a client to `address`, made the default here."""
    if not address:
        yield
        return
    from distributed import Client

    with Client(address, set_as_default=True):
        yield
