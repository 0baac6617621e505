"""Verified downloads, safe archive extraction and the one-time CIFAR-10 -> PNG ImageFolder
conversion, so every dataset SPEC ends up file-backed.

Layout under `<data_dir>/cifar10/`: the archive `cifar-10-python.tar.gz` and the converted tree
`images/{train,test}/<class>/NNNNN.png` (NNNNN = the image's index in torchvision's CIFAR10 order).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import pickle
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from visionflow.data.images import thread_map
from visionflow.errors import DatasetError, one_line

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR10_BATCH_DIR = "cifar-10-batches-py"
_CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    """md5 hex digest of a file (the checksum CIFAR-10 publishes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _fetch_once(url: str, dest: Path, timeout: float) -> tuple[Path, str]:
    """Stream url into a unique temp file beside dest (unique, so concurrent downloads of the
    same file never write into each other); returns (temp path, md5)."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest.hexdigest()


def _is_retriable(err: Exception) -> bool:
    # A 4xx answer (wrong URL, forbidden) will not change on retry; 5xx, 429 and network errors may.
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code == 429
    return True


def _one_line(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    return one_line(getattr(err, "reason", "") or err)  # a URLError's reason, without "<urlopen error ...>"


def download_url(
    url: str, dest: Path | str, md5: str | None = None, retries: int = 3, backoff: float = 1.0, timeout: float = 60.0
) -> Path:
    """Download url to dest, verified against md5 when given. Already-present verified files are
    kept without network access. Data goes to a unique temp name and is renamed only once
    complete and verified; network errors are retried `retries` times with exponential backoff
    (backoff, 2*backoff, ...). Raises DatasetError with one line saying how to place the file by hand."""
    dest = Path(dest)
    if dest.is_file():
        if md5 is None or file_md5(dest) == md5:
            return dest
        log.warning("%s fails its md5 check (expected %s); downloading it again", dest, md5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    by_hand = f"download it elsewhere and put {dest.name} in {dest.parent}/"
    attempts = max(0, retries) + 1
    last_error: Exception | None = None
    for attempt in range(attempts):
        if last_error is not None:
            delay = backoff * 2 ** (attempt - 1)
            log.info(
                "retrying %s in %.1fs (attempt %d of %d): %s", url, delay, attempt + 1, attempts, _one_line(last_error)
            )
            time.sleep(delay)
        try:
            log.info("downloading %s -> %s", url, dest)
            tmp, got = _fetch_once(url, dest, timeout)
        except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
            last_error = err
            if not _is_retriable(err):
                break
            continue
        if md5 is not None and got != md5:
            os.unlink(tmp)
            raise DatasetError(f"Download of {url} failed its md5 check (got {got}, expected {md5}); {by_hand}")
        os.replace(tmp, dest)
        return dest
    raise DatasetError(
        f"Could not download {url} ({_one_line(last_error)}) after {attempt + 1} attempt(s); if offline, {by_hand}"
    )


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why an archive member may not be extracted, or None when it is a plain file/dir inside."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in parts:
        return "escapes the target folder with '..'"
    if member.issym() or member.islnk():
        return f"is a link (to '{member.linkname}')"
    if not (member.isfile() or member.isdir()):
        return "is a device, FIFO or other special file"
    return None


def safe_extract(archive: Path | str, target: Path | str) -> None:
    """Extract a tar archive into target, refusing (DatasetError, nothing extracted) any member
    that is absolute, contains '..', is a symlink/hardlink or a device. tarfile's 'data' filter
    is applied as well, as a second line of defence."""
    archive, target = Path(archive), Path(target)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                problem = _member_problem(member)
                if problem:
                    raise DatasetError(
                        f"Refusing to extract {archive}: member '{member.name}' {problem}; "
                        "expected only regular files and folders inside the archive"
                    )
            target.mkdir(parents=True, exist_ok=True)
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DatasetError(f"Cannot extract {archive}: {_one_line(err)}; expected a readable tar archive") from None


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles; plain pickle.load would run arbitrary code from the archive.
    Only the numpy globals needed to rebuild arrays are allowed, plus _codecs.encode, a pure
    str -> bytes function that protocol-2 pickles written by Python 3 use for bytes values."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = _BatchUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DatasetError(f"Cannot read CIFAR-10 batch {path.name}: {_one_line(err)}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"CIFAR-10 batch {path.name} is not a dict; expected the python-pickle format")
    # The original batches were pickled by Python 2, so keys arrive as bytes.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) labels of one batch, checked for shape and range."""
    batch = _read_pickle(path)
    data = np.asarray(batch.get("data"))
    labels = np.asarray(batch.get("labels"), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8 or len(labels) != len(data):
        raise DatasetError(
            f"CIFAR-10 batch {path.name} has data {data.shape} {data.dtype} and "
            f"{len(labels)} labels; expected (N, 3072) uint8 and N labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"CIFAR-10 batch {path.name} has labels outside 0..{num_classes - 1}")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _write_pngs(batches: Path, out: Path) -> None:
    """Convert the extracted pickle batches into out/{train,test}/<class>/NNNNN.png."""
    meta = _read_pickle(batches / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", [])]
    if not classes or len(set(classes)) != len(classes):
        raise DatasetError(f"CIFAR-10 batches.meta has label_names {classes}; expected unique class names")
    for split, names in _CIFAR10_SPLITS.items():
        parts = [_read_batch(batches / name, len(classes)) for name in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        _save_pngs(images, labels, [out / split / name for name in classes])


def _save_pngs(images: np.ndarray, labels: np.ndarray, class_dirs: list[Path]) -> None:
    """Write image i to class_dirs[labels[i]]/iiiii.png on the thread pool (PNG encoding
    releases the GIL)."""
    for folder in class_dirs:
        folder.mkdir(parents=True)

    def save(index: int) -> None:
        path = class_dirs[labels[index]] / f"{index:05d}.png"
        Image.fromarray(images[index]).save(path, format="PNG")

    thread_map(save, range(len(labels)))


def prepare_cifar10(
    data_dir: Path | str = "data",
    url: str = CIFAR10_URL,
    retries: int = 3,
    backoff: float = 1.0,
    download: bool = True,
    md5: str = CIFAR10_MD5,
) -> Path:
    """Make `<data_dir>/cifar10/images/{train,test}/<class>/*.png` exist and return that folder.
    Downloads (or reuses a verified) archive, extracts it safely and converts it once; the tree
    is built in a temp folder and renamed into place, so a crash never leaves half a dataset."""
    base = Path(data_dir) / "cifar10"
    tree = base / "images"
    if (tree / "train").is_dir() and (tree / "test").is_dir():
        return tree
    archive = base / CIFAR10_ARCHIVE
    if download:
        download_url(url, archive, md5=md5, retries=retries, backoff=backoff)
    elif not (archive.is_file() and file_md5(archive) == md5):
        raise DatasetError(
            f"CIFAR-10 is not in {base}/ (or fails its md5 check) and downloading is off; "
            f"put {CIFAR10_ARCHIVE} (from {url}) in {base}/"
        )
    log.info("converting %s to PNG files under %s", archive, tree)
    # The temp folder is hidden (leading dot) so folder scans of data_dir never pick it up.
    with tempfile.TemporaryDirectory(dir=base, prefix=".prepare-") as tmp:
        work = Path(tmp)
        safe_extract(archive, work / "extracted")
        _write_pngs(work / "extracted" / _CIFAR10_BATCH_DIR, work / "images")
        try:
            os.replace(work / "images", tree)
        except OSError:
            # A concurrent preparer renamed its complete tree first; keep theirs, drop ours.
            if not (tree / "train").is_dir():
                raise
    return tree
