"""File I/O helpers shared by every layer: atomic writes, sha256 of files, atomic copies and
hard links, advisory locks. No torch import here: the CLI and tasks use it without loading torch.

Every write goes to a temporary file in the destination folder, is flushed and fsynced, then
renamed over the target, so a crash at any moment leaves the previous file intact.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: the directory entry itself must reach the disk (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (readers see the old file or the new one, never a part)."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_atomic(source: Path | str, target: Path | str) -> Path:
    """Copy a file so that ``target`` is either absent, its old version or the complete copy."""

    def copy(handle: IO[bytes]) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle)

    return atomic_write(target, copy)


# link() errors that mean "this file system (or this file) cannot be linked here": copy instead.
_CANNOT_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}


def link_or_copy(source: Path | str, target: Path | str) -> Path:
    """Make ``target`` a hard link of ``source`` (no bytes copied), atomically: the link gets a
    temporary name beside ``target`` and is renamed over it. Where linking is impossible (another
    file system, a file system without hard links, the link limit) ``copy_atomic`` copies.

    A hard link shares the file with ``source``: it must never be modified in place, only
    replaced (every write in this package is atomic, which replaces the file)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.urandom(4).hex()}.link")
    try:
        os.link(source, tmp)
    except OSError as err:
        if err.errno not in _CANNOT_LINK:
            raise
        return copy_atomic(source, target)
    try:
        os.replace(tmp, target)
    finally:
        # rename() of two links to one file does nothing and leaves tmp: target already is the link.
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)
    return target


def user_cache_dir() -> Path:
    """visionflow's per-user cache folder: `$XDG_CACHE_HOME/visionflow`, else ~/.cache/visionflow."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "visionflow"


def file_sha256(path: Path | str) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    # Unbuffered reads of up to 1 MiB: a small file costs one read. (hashlib.file_digest zero-fills
    # a fresh 256 KiB buffer per call, which dominates for 60,000 files of a few KiB.)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open_lock_file(path: Path | str) -> int:
    """A descriptor of the lock file ``path``, created (with its folder) when missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def try_lock(path: Path | str) -> int | None:
    """An exclusive advisory lock (flock) on ``path`` without waiting: its file descriptor, or
    None when another open file holds it. The kernel drops the lock when its holder dies, so a
    killed process never leaves a stale lock; release it with ``unlock``."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    """Release a lock taken by ``try_lock`` or ``locked``."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextmanager
def locked(path: Path | str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` for the block, waiting for it as long as needed."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
