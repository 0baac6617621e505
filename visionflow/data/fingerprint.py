"""Content fingerprints of splits and datasets: the same bytes under the same relative paths and
class names give the same fingerprint on any machine, wherever the folder lives; any changed
byte, added/removed/renamed file or file moved to another class gives a new one. They key the
decoded-tensor cache and Prefect task caching, and are recorded in run manifests.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

from visionflow.data.images import thread_map
from visionflow.data.splits import DatasetInfo, Split
from visionflow.fileio import file_sha256


def fingerprint_from_digests(split: Split, digests: Sequence[str]) -> str:
    """fingerprint_split for already computed file digests (digests[i] belongs to split.files[i]),
    so a pass that reads every file anyway (validation) need not read them twice."""
    if len(digests) != len(split):
        raise ValueError(f"{len(digests)} digests for a split of {len(split)} files")
    h = hashlib.sha256()
    # The class list is part of the identity: the same files with an extra (empty) class mean
    # different label indices, and the cache keyed by this value stores indices.
    h.update(("classes\0" + "\0".join(split.classes) + "\n").encode())
    rows = sorted((split.relpath(i), split.classes[split.labels[i]], digests[i]) for i in range(len(split)))
    for relpath, class_name, digest in rows:
        # NUL cannot occur in a path or class name, so the fields cannot run into each other.
        h.update(f"{relpath}\0{class_name}\0{digest}\n".encode())
    return h.hexdigest()


def fingerprint_split(split: Split) -> str:
    """64-hex sha256 over the class names and, per file in relative-path order, the relative
    path, class name and sha256 of the bytes. Independent of the absolute location."""
    return fingerprint_from_digests(split, thread_map(file_sha256, split.files))


def combine_fingerprints(split_fingerprints: Mapping[str, str]) -> str:
    """64-hex sha256 over split names and their fingerprints, in name order."""
    h = hashlib.sha256()
    for name in sorted(split_fingerprints):
        h.update(f"{name}\0{split_fingerprints[name]}\n".encode())
    return h.hexdigest()


def fingerprint_dataset(info: DatasetInfo) -> str:
    """64-hex sha256 over the split names and their fingerprints."""
    return combine_fingerprints({name: fingerprint_split(split) for name, split in info.splits.items()})
