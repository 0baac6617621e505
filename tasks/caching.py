"""Caching for the pipeline's tasks, configured once on each task's decorator (`cached_task`):

- **Keys that cannot go stale.** A key covers the source of the whole core package `visionflow/`
  (one digest per process), the task's own source, and the inputs the task names, each reduced
  to what identifies it (a dataset to its fingerprint, a checkpoint to its sha256).
- **Results that are small, verified references.** Every cached task returns a `TaskOutput`
  whose `files` map run-directory-relative paths to `FileRef(path, sha256)`. Before Prefect
  looks a key up, `VerifiedCache` re-hashes every file the stored record refers to, under the
  key's lock; a missing or changed file deletes the record, so the task recomputes (a miss,
  never an error). `output.refresh` deletes it the same way.
- **Durable storage and crash-safe locks.** `durable_results(output)`, entered once by a flow,
  stores results under `<output_dir>/.prefect-results`, shared by every run there, with
  SERIALIZABLE isolation on flock locks: a concurrent run waits for a result instead of
  computing it twice, and a lock dies with its process (kill -9 included). The store reaches
  task runs in other processes (a Dask worker, flows/sweep.py) inside Prefect's serialized flow
  run context, with the block's scope (refresh) on its lock manager.
- **Prefect internals** used here (the flow run's result store, transactions, the record format,
  hook log lines) go through tasks/prefect_compat.py.
- **Outcomes from Prefect's own states.** A state hook records each task's outcome (completed
  or cached) for the manifest; `finish_run` hard-links a cached result's files into the run.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from prefect import Task, get_run_logger, task
from prefect.cache_policies import CachePolicy
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.results import ResultStore
from prefect.states import State
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel, ConfigDict

import visionflow
from tasks.prefect_compat import (
    QuietHookLines,
    flow_run_result_store,
    no_enclosing_transaction,
    read_result_record,
    record_path,
)
from visionflow.config import OutputConfig
from visionflow.errors import VisionflowError
from visionflow.fileio import file_sha256, link_or_copy, try_lock, unlock
from visionflow.retention import LOCKS_SUBDIR, RESULTS_SUBDIR, lock_file
from visionflow.train.stopping import TrainingTimedOut

CORE_PACKAGE = Path(visionflow.__file__).resolve().parent


class FileRef(BaseModel):
    """A file a result depends on, with the sha256 it had when the result was produced."""

    model_config = ConfigDict(frozen=True)
    path: str
    sha256: str

    @classmethod
    def of(cls, path: Path | str) -> FileRef:
        path = Path(path).resolve()
        return cls(path=str(path), sha256=file_sha256(path))

    def problem(self) -> str | None:
        """Why this reference no longer holds (None when the file is there, unchanged)."""
        if not os.path.isfile(self.path):
            return f"{self.path} is missing"
        if file_sha256(self.path) != self.sha256:
            return f"{self.path} changed (sha256 differs)"
        return None


class TaskOutput(BaseModel):
    """Base of every cached task result: small values plus `files`, run-directory-relative
    path -> FileRef. Subclasses add what their consumers need (metrics, paths, counts)."""

    model_config = ConfigDict(frozen=True)
    files: dict[str, FileRef] = {}

    def problems(self) -> list[str]:
        return [p for ref in self.files.values() if (p := ref.problem()) is not None]

    def adopted_into(self, run_dir: Path | str) -> TaskOutput:
        """This output with every file adopted into its place in `run_dir`: a cached result points
        into the run that computed it; each run directory holds its own hard link of the file
        (a copy across file systems), so deleting one run never breaks another, and the bytes
        are on disk once."""
        run_dir = Path(run_dir).resolve()
        files = {}
        for relpath, ref in self.files.items():
            target = run_dir / relpath
            if Path(ref.path) != target:
                link_or_copy(ref.path, target)
            files[relpath] = FileRef(path=str(target), sha256=ref.sha256)
        return self.model_copy(update={"files": files})


@contextmanager
def written_files(run_dir: Path | str, *always: str) -> Iterator[dict[str, FileRef]]:
    """Collects, on exit, every file under `run_dir` that the block created or rewrote (atomic
    writes replace the file; TensorBoard names its event files itself), plus the `always`
    run-directory-relative paths (outputs kept from before, e.g. a resumed run's best.pt)."""
    run_dir = Path(run_dir).resolve()

    def snapshot() -> dict[Path, tuple[int, int, int]]:
        return {p: (s.st_ino, s.st_mtime_ns, s.st_size) for p in run_dir.rglob("*") if p.is_file() and (s := p.stat())}

    before = snapshot()
    written: dict[str, FileRef] = {}
    yield written
    changed = [path.relative_to(run_dir).as_posix() for path, stat in snapshot().items() if before.get(path) != stat]
    for relpath in sorted({*changed, *always}):
        written[relpath] = FileRef.of(run_dir / relpath)


def results_dir(output_dir: Path | str) -> Path:
    """Durable result storage shared by all runs under one output directory."""
    return (Path(output_dir) / RESULTS_SUBDIR).resolve()


# ---------------------------------------------------------------------------------------------
# Locks


class FlockLockManager(LockManager):
    """Prefect lock manager on OS advisory locks (flock, `fileio.try_lock`), one file per key.

    Unlike Prefect's FileSystemLockManager, whose lock files outlive a killed process (and then
    block every later run of that task forever), the kernel drops a flock when its holder dies,
    so a crashed run can simply be rerun. flock conflicts between two open files even inside
    one process, so concurrent flows in threads are serialized too."""

    def __init__(
        self, lock_files_directory: Path | str, poll_seconds: float = 0.1, scope: _Scope | None = None
    ) -> None:
        self.directory = Path(lock_files_directory)
        self.poll_seconds = poll_seconds
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, fd)
        # The durable_results block that made this store: it travels with the flow run's result
        # store to a task run in another process (a Dask worker), where that block's ContextVar is unset.
        self.scope = scope

    def _wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)
        return True

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        # hold_timeout is not needed: the lock cannot outlive its process.
        if self.is_lock_holder(key, holder):
            return True

        def take() -> bool:
            fd = try_lock(lock_file(self.directory, key))
            if fd is not None:
                self._held[key] = (holder, fd)
            return fd is not None

        return self._wait(take, acquire_timeout)

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for key {key}")
        unlock(self._held.pop(key)[1])

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        fd = try_lock(lock_file(self.directory, key))
        if fd is None:
            return True
        unlock(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self._held.get(key, (None, -1))[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self._wait(lambda: not self.is_locked(key), timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.wait_for_lock(key, timeout)


# ---------------------------------------------------------------------------------------------
# The flow's scope: durable storage, refresh, outcomes


@dataclass
class _Scope:
    refresh: bool
    outcomes: dict[str, str] = field(default_factory=dict)  # task name -> "completed" | "cached"


_SCOPE: ContextVar[_Scope | None] = ContextVar("visionflow_results_scope", default=None)


@contextmanager
def durable_results(output: OutputConfig) -> Iterator[dict[str, str]]:
    """Inside a flow run: cached tasks keep their results under `<output_dir>/.prefect-results`
    (flock locks in its `locks/`), `output.refresh` recomputes them; yields the outcome of each
    task that completed in the block (name -> "completed" or "cached"), for the manifest."""
    store_dir = results_dir(output.output_dir)
    scope = _Scope(refresh=output.refresh)
    token = _SCOPE.set(scope)
    try:
        with flow_run_result_store(store_dir, FlockLockManager(store_dir / LOCKS_SUBDIR, scope=scope)):
            yield scope.outcomes
    finally:
        _SCOPE.reset(token)


@contextmanager
def own_transactions() -> Iterator[None]:
    """Inside a cached task's run, for a flow run it starts (a sweep's trial running the training
    flow): the cached tasks of that flow run commit their results and release their locks as each
    ends, as in a flow run of its own. Otherwise Prefect makes their transactions children of the
    enclosing task's: a child commits, and releases its lock, only with its parent, so concurrent
    trials wait for each other's data steps; and when the parent fails, its rollback skips the
    children that were cache hits (already committed), whose locks then stay held as long as their
    process lives (a Dask worker's): the next run needing those results waits forever."""
    with no_enclosing_transaction():
        yield


def task_outcomes() -> dict[str, str]:
    """The outcomes recorded so far in the enclosing `durable_results` block."""
    scope = _SCOPE.get()
    return dict(scope.outcomes) if scope is not None else {}


def record_outcome(task: Task, task_run: TaskRun, state: State) -> None:
    """State hook (on completion): note whether the task computed its result or reused one."""
    if (scope := _SCOPE.get()) is not None:
        scope.outcomes[task.name] = "cached" if state.name == "Cached" else "completed"


class _ExpectedErrorsInOneLine(logging.Filter):
    """Prefect logs a failed task or flow run with the exception's traceback. For errors the
    product raises on purpose (VisionflowError: bad data, config, checkpoint, device;
    TrainingTimedOut: training.timeout_minutes) the one-line message says everything, so the
    traceback is left out of the log, as the CLI leaves it out of its output."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (VisionflowError, TrainingTimedOut)):
            record.exc_info, record.exc_text = None, None
        return True


# Prefect logs two lines around every hook it runs: for this bookkeeping hook they would double
# the run log's task lines (a failing hook is still logged).
logging.getLogger("prefect.task_runs").addFilter(QuietHookLines(record_outcome.__name__))
for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_ExpectedErrorsInOneLine())


# ---------------------------------------------------------------------------------------------
# Cache policy


@functools.cache
def core_digest(package: Path = CORE_PACKAGE) -> str:
    """sha256 over the path and bytes of every .py file of the core package (once per process)."""
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(f"{path.relative_to(package).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def task_cache_key(
    task: Task, inputs: Mapping[str, Any], projections: Mapping[str, Callable[[Any], Any] | None]
) -> str:
    """The key of one call: the core package digest, the task's source and the named inputs
    (each through its projection, when it has one)."""
    material = {
        name: _jsonable(project(inputs[name]) if project else inputs[name]) for name, project in projections.items()
    }
    return hash_objects(core_digest(), inspect.getsource(task.fn), material, raise_on_failure=True)


def _stored_output(store: ResultStore, key: str, holder: str) -> Any:
    # ResultStore.read is the only way to load a record that Prefect wrote (format, serializer);
    # tests/tasks/test_caching.py fails on an upgrade that changes it.
    return store.read(key, holder=holder).result


def result_files(record: Path) -> list[str] | None:
    """The absolute paths of the files a cached result record (a file of `results_dir`) refers
    to, for retention (visionflow.retention); None when the record cannot be read."""
    try:
        value = read_result_record(record)
    except Exception:  # any record this code cannot load (format, a class gone): left alone
        return None
    return [ref.path for ref in value.files.values()] if isinstance(value, TaskOutput) else []


@dataclass
class VerifiedCache(CachePolicy):
    """Key = `task_cache_key`; before the lookup, a stored result whose files are gone or
    changed (or any stored result, when refreshing) is removed, which turns it into a miss."""

    inputs: Mapping[str, Callable[[Any], Any] | None] = field(default_factory=dict)

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        key = task_cache_key(task_ctx.task, inputs, self.inputs)
        self._drop_if_stale(task_ctx, key)
        return key

    @staticmethod
    def _drop_if_stale(task_ctx: TaskRunContext, key: str) -> None:
        store, scope = task_ctx.result_store, _SCOPE.get()
        if scope is None and isinstance(store.lock_manager, FlockLockManager):  # a task run in another process
            scope = store.lock_manager.scope
        record = record_path(store, key)
        if scope is None or record is None:
            raise RuntimeError(f"Task {task_ctx.task.name} is cached: call it inside tasks.caching.durable_results()")
        holder = f"verify-{uuid4()}"
        store.acquire_lock(key, holder=holder)
        try:
            if not store.exists(key):
                return
            try:
                result = _stored_output(store, key, holder)
                problems = result.problems() if isinstance(result, TaskOutput) else []
            except Exception as err:  # a record this code cannot load is as useless as a stale one
                problems = [f"stored record unreadable: {err}"]
            if scope.refresh:
                problems = ["refresh requested"]
            if problems:
                get_run_logger().warning(
                    "Cached result of %s dropped (%s); recomputing", task_ctx.task.name, "; ".join(problems)
                )
                record.unlink(missing_ok=True)
        finally:
            store.release_lock(key, holder=holder)


def cached_task(
    *names: str,
    retries: int = 0,
    retry_delay_seconds: int | list[int] = 0,
    timeout_seconds: float | None = None,
    task_run_name: str | Callable[..., str] | None = None,
    **projections: Callable[[Any], Any],
) -> Callable[[Callable], Task]:
    """`@task` for a pipeline step whose result is reused: keyed on the inputs in `names` (as
    they are) and `projections` (input name -> function giving its identity), stored durably
    (`durable_results`), verified before reuse, its outcome recorded for the manifest; its runs
    named by `task_run_name` (Prefect's option)."""
    policy = VerifiedCache(inputs={**{name: None for name in names}, **projections}).configure(
        isolation_level="SERIALIZABLE"
    )
    # Results are not kept in memory: a record on disk may be replaced by another process, and
    # only the disk copy is verified.
    return task(
        cache_policy=policy,
        persist_result=True,
        cache_result_in_memory=False,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        timeout_seconds=timeout_seconds,
        task_run_name=task_run_name,
        on_completion=[record_outcome],
    )
