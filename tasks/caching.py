"""Caching for the pipeline's tasks: cache keys built from what determines a result, cached
results that are small references to files (verified before they are reused), durable result
storage under the output directory, and crash-safe locks so concurrent runs never compute or
write the same result twice.

How a cached result stays valid: every heavy task returns a `TaskOutput`, a small pydantic model
whose `files` map run-directory-relative paths to `FileRef(path, sha256)`. `VerifiedCache`
computes the key, then, under the key's lock, reads the stored record and checks every file it
references. A missing or changed file makes the policy delete that record, so Prefect's lookup
that follows finds nothing and the task recomputes (a miss, never an error). The check runs
under the same lock the transaction takes, so it cannot race a concurrent writer.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import inspect
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

from prefect import Task, get_run_logger
from prefect.cache_policies import CachePolicy, TaskSource
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.locking.protocol import LockManager
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel, ConfigDict

from visionflow.fileio import copy_atomic, file_sha256

RESULTS_SUBDIR = ".prefect-results"


class FileRef(BaseModel):
    """A file a result depends on, with the sha256 it had when the result was produced."""

    model_config = ConfigDict(frozen=True)
    path: str
    sha256: str

    @classmethod
    def of(cls, path: Path | str) -> "FileRef":
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

    def file(self, relpath: str) -> Path:
        return Path(self.files[relpath].path)

    def adopted_into(self, run_dir: Path | str) -> "TaskOutput":
        """This output with every file copied to its place in `run_dir` (a cached result points
        into the run that computed it; each run directory must hold its own copy)."""
        run_dir = Path(run_dir).resolve()
        files = {}
        for relpath, ref in self.files.items():
            target = run_dir / relpath
            if Path(ref.path) != target:
                copy_atomic(ref.path, target)
            files[relpath] = FileRef(path=str(target), sha256=ref.sha256)
        return self.model_copy(update={"files": files})


def outputs_in(run_dir: Path | str, relpaths: list[str]) -> dict[str, FileRef]:
    """`files` for a TaskOutput: the given run-directory-relative paths, hashed now."""
    return {relpath: FileRef.of(Path(run_dir) / relpath) for relpath in relpaths}


@contextmanager
def created_files(run_dir: Path | str, folder: Path | str) -> Iterator[dict[str, FileRef]]:
    """Collects, on exit, the files that appeared under `folder` during the block (TensorBoard
    names its event files itself), as `files` entries relative to `run_dir`."""
    run_dir, folder = Path(run_dir).resolve(), Path(folder).resolve()
    before = set(folder.rglob("*")) if folder.is_dir() else set()
    created: dict[str, FileRef] = {}
    yield created
    for path in sorted(set(folder.rglob("*")) - before):
        if path.is_file():
            created[path.relative_to(run_dir).as_posix()] = FileRef.of(path)


def results_dir(output_dir: Path | str) -> Path:
    """Durable result storage shared by all runs under one output directory."""
    return (Path(output_dir) / RESULTS_SUBDIR).resolve()


# ---------------------------------------------------------------------------------------------
# Locks


class FlockLockManager(LockManager):
    """Prefect lock manager on OS advisory locks (flock), one lock file per key.

    Unlike Prefect's FileSystemLockManager, whose lock files outlive a killed process (and then
    block every later run of that task forever), the kernel drops a flock when its holder dies,
    so a crashed run can simply be rerun. flock conflicts between two open files even inside
    one process, so concurrent flows in threads are serialized too."""

    def __init__(self, lock_files_directory: Path | str, poll_seconds: float = 0.1) -> None:
        self.directory = Path(lock_files_directory)
        self.poll_seconds = poll_seconds
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, fd)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    def _try_lock(self, key: str) -> int | None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        # hold_timeout is not needed: the lock cannot outlive its process.
        if self.is_lock_holder(key, holder):
            return True
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while (fd := self._try_lock(key)) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)
        self._held[key] = (holder, fd)
        return True

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for key {key}")
        _, fd = self._held.pop(key)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        fd = self._try_lock(key)
        if fd is None:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self._held.get(key, (None, -1))[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.wait_for_lock(key, timeout)


# ---------------------------------------------------------------------------------------------
# Cache policy


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _module_digest(modules: tuple[str, ...]) -> str:
    sources = (inspect.getsource(importlib.import_module(name)) for name in modules)
    return hashlib.sha256("\0".join(sources).encode()).hexdigest()


@dataclass
class VerifiedCache(CachePolicy):
    """Key = the task's source (TaskSource), the source of the core modules it calls, and the
    named inputs, each optionally projected to what identifies it (a dataset -> its
    fingerprint). Before the lookup, a stored result whose files are gone or changed is
    removed, which turns it into a miss."""

    inputs: Mapping[str, Callable[[Any], Any] | None] = field(default_factory=dict)
    modules: tuple[str, ...] = ()  # names: the policy is deep-copied, modules cannot be

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        material = {name: _jsonable(project(inputs[name]) if project else inputs[name])
                    for name, project in self.inputs.items()}
        key = hash_objects(TaskSource().compute_key(task_ctx, inputs, flow_parameters),
                           _module_digest(self.modules), material, raise_on_failure=True)
        if not task_ctx.task.refresh_cache:
            self._drop_if_stale(task_ctx, key)
        return key

    @staticmethod
    def _drop_if_stale(task_ctx: TaskRunContext, key: str) -> None:
        store = task_ctx.result_store
        storage = store.result_storage
        if not isinstance(storage, LocalFileSystem):
            raise TypeError(f"VerifiedCache needs local result storage, got {type(storage).__name__}; "
                            f"bind the task with tasks.caching.bind()")
        holder = f"verify-{uuid4()}"
        locked = store.lock_manager is not None and store.acquire_lock(key, holder=holder)
        try:
            if not store.exists(key):
                return
            try:
                result = store.read(key, holder=holder).result
                problems = result.problems() if isinstance(result, TaskOutput) else []
            except Exception as err:  # a record this code cannot load is as useless as a stale one
                problems = [f"stored record unreadable: {err}"]
            if problems:
                get_run_logger().warning("Cached result of %s is stale (%s); recomputing",
                                         task_ctx.task.name, "; ".join(problems))
                (Path(storage.basepath) / key).unlink(missing_ok=True)
        finally:
            if locked:
                store.release_lock(key, holder=holder)


def verified_cache(*names: str, modules: tuple[str, ...] = (), **projections: Callable[[Any], Any]) -> VerifiedCache:
    """A VerifiedCache keyed on `names` (inputs as they are) and `projections` (input name ->
    function of the input giving its identity)."""
    return VerifiedCache(inputs={**{name: None for name in names}, **projections}, modules=modules)


def bind(task: Task, output_dir: Path | str, refresh: bool) -> Task:
    """The task with durable result storage under `output_dir`, SERIALIZABLE isolation on
    flock locks (a concurrent run waits for the result instead of recomputing it), and
    `refresh` forcing recomputation. Results are not kept in memory: a record on disk may be
    replaced by another process, and only the disk copy is verified."""
    if not isinstance(task.cache_policy, VerifiedCache):
        raise TypeError(f"Task {task.name} has no VerifiedCache policy; only cached tasks are bound")
    store = results_dir(output_dir)
    policy = task.cache_policy.configure(isolation_level="SERIALIZABLE", lock_manager=FlockLockManager(store / "locks"))
    return task.with_options(result_storage=store, cache_policy=policy, persist_result=True,
                             cache_result_in_memory=False, refresh_cache=refresh)


class TaskLedger:
    """Runs tasks for a flow and records each one's outcome ("completed" or "cached") for the
    manifest; a cached TaskOutput is adopted into the current run directory."""

    def __init__(self) -> None:
        self.statuses: dict[str, str] = {}

    def run(self, task: Task, *args: Any, run_dir: Path | None = None, **kwargs: Any) -> Any:
        state = task(*args, return_state=True, **kwargs)
        result = state.result()  # re-raises the task's own error when it failed
        cached = state.name == "Cached"
        self.statuses[task.name] = "cached" if cached else "completed"
        if cached and run_dir is not None and isinstance(result, TaskOutput):
            result = result.adopted_into(run_dir)
            if result.files:
                get_run_logger().info("%s: cached, copied %d file(s) into %s", task.name, len(result.files), run_dir)
        return result
