"""User-facing errors: the CLI prints them as one line and exits 2, no traceback. The one-line
text of any exception, of a pydantic ValidationError and of an OSError about a path is made here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pydantic import ValidationError


class VisionflowError(Exception):
    """Base class for errors caused by user input (bad data, config, checkpoint, device)."""


class DatasetError(VisionflowError):
    """A dataset spec, folder, archive or download is not what was expected."""


class ConfigError(VisionflowError):
    """A configuration value is invalid."""


class CheckpointError(VisionflowError):
    """A checkpoint or export file cannot be loaded safely."""


class DeviceError(VisionflowError):
    """The requested device is not available."""


class PathError(VisionflowError):
    """A path the user gave cannot be created, read or written."""


def one_line(err: BaseException | str) -> str:
    """An exception's message (or a message) with every run of whitespace, newlines too, as one space;
    an exception without a message: its type's name."""
    return " ".join(str(err).split()) or type(err).__name__


class FieldProblem(NamedTuple):
    """The first problem of a pydantic ValidationError."""

    field: str  # dotted location, e.g. 'training.epochs'
    message: str  # pydantic's sentence, e.g. 'Input should be greater than 0'
    got: Any  # the rejected input

    def __str__(self) -> str:
        return f"'{self.field}': {self.message} (got {self.got!r})"


def _is_union_member(part: int | str) -> bool:
    # pydantic names the union member it tried in the location ('SweepRange', 'list[any]'); field names are lower case
    return isinstance(part, str) and ("[" in part or part[:1].isupper())


def field_problem(err: ValidationError, whole: str) -> FieldProblem:
    """The first problem of `err`, its field named without union members; `whole` when the whole input was rejected."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"] if not _is_union_member(part)) or whole
    return FieldProblem(field, first["msg"], first.get("input"))


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its nearest ancestor that exists ('.' for a relative path that does not)."""
    return next((p for p in (path, *path.parents) if os.path.exists(p)), Path("."))


def _unusable(path: str | Path, reason: str, expected: str) -> PathError:
    return PathError(f"Cannot use '{path}': {reason}; expected {expected}")


def path_error(err: OSError, expected: str = "a path this command can read or create") -> PathError:
    """An OSError about `err.filename` as one line: the path, what is wrong with it, what was expected there."""
    path = Path(os.fsdecode(err.filename))
    blocker = _nearest_existing(path.parent)
    if isinstance(err, NotADirectoryError) and not blocker.is_dir():
        return _unusable(path, f"'{blocker}' is a file, not a directory", expected)
    return _unusable(path, (err.strerror or one_line(err)).lower(), expected)


def check_directory(path: str | Path, expected: str, *, writable: bool = False) -> None:
    """Raise PathError unless `path` is a directory or can become one: its nearest existing ancestor
    is a directory (and writable, with `writable`). Creates nothing, so a later error leaves nothing behind."""
    existing = _nearest_existing(Path(path))
    if not existing.is_dir():
        raise _unusable(path, f"'{existing}' is a file, not a directory", expected)
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise _unusable(path, f"'{existing}' is not writable", expected)


def make_directory(path: str | Path, expected: str) -> Path:
    """`path` as a directory, made with its parents if missing; an OSError -> PathError."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise path_error(err, expected) from None
    return Path(path)


def check_readable(path: str | Path, expected: str) -> None:
    """Raise PathError unless `path` is a file this process can open for reading."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise path_error(err, expected) from None
