"""Datasets named by a SPEC string, resolved to file-backed splits.

SPEC is `sample` (the bundled subset), `cifar10` (downloaded and converted to PNG once), or a
folder: `ROOT/train/<class>/*` plus `ROOT/val/<class>/*` or `ROOT/test/<class>/*` (ImageFolder
layout; `val` wins when both exist, keeping `test` untouched for final reporting), or
`ROOT/<class>/*` alone (or `ROOT/train/<class>/*` alone), split by a seeded, stratified fraction.

Hidden entries (leading '.') and non-files are ignored. Files with non-image extensions are kept
in the split so that validation can report them ("not an image") rather than hiding them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from visionflow.data.download import CIFAR10_URL, prepare_cifar10
from visionflow.errors import DatasetError

EVAL_SPLITS = ("val", "test")  # preference order
CACHE_SUBDIR = "cache"  # decoded tensors (visionflow.data.decoded) live in <data.data_dir>/cache
# `sample` lives at <data_dir>/sample; outside the repo checkout the copy bundled beside the
# package is used, so `--dataset sample` works from any working directory.
BUNDLED_SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
_EXPECTED = (
    "expected 'sample', 'cifar10', or a folder laid out as ROOT/train/<class>/* with "
    "ROOT/val/<class>/* or ROOT/test/<class>/*, or as ROOT/<class>/*"
)


@dataclass(frozen=True)
class Split:
    """One split: files (absolute paths) and their labels, indices into the dataset-wide classes."""

    name: str  # "train" | "val" | "test"
    root: Path  # split folder; relative paths are relative to it
    classes: tuple[str, ...]  # dataset-wide class names, sorted; label i = classes[i]
    files: tuple[Path, ...]  # absolute, sorted by (class, relative path)
    labels: tuple[int, ...]  # same length as files

    def __len__(self) -> int:
        return len(self.files)

    def relpath(self, i: int) -> str:
        """Posix path of file i relative to the split root, e.g. "ants/1.jpg"."""
        file, root = str(self.files[i]), str(self.root)
        # Slicing the string is ~10x faster than Path.relative_to, which matters because
        # fingerprints call this for every one of 60,000 files; files are built as root / relpath.
        if file.startswith(root + os.sep):
            return file[len(root) + 1 :].replace(os.sep, "/")
        return self.files[i].relative_to(self.root).as_posix()

    def without(self, paths: Iterable[Path]) -> "Split":
        """A copy without the given files (used to leave out invalid images)."""
        drop = set(paths)
        kept = [(f, y) for f, y in zip(self.files, self.labels) if f not in drop]
        return replace(self, files=tuple(f for f, _ in kept), labels=tuple(y for _, y in kept))

    def class_counts(self) -> dict[str, int]:
        """Files per class name, every dataset class included (0 for an empty one)."""
        counts = dict.fromkeys(self.classes, 0)
        for label in self.labels:
            counts[self.classes[label]] += 1
        return counts


@dataclass(frozen=True)
class DatasetInfo:
    """A resolved dataset: always a "train" split plus exactly one eval split ("val" or "test")."""

    spec: str  # as given by the user
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, Split]

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def eval_split(self) -> Split:
        return self.splits["val"] if "val" in self.splits else self.splits["test"]


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".")


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders (the classes) of folder."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if _visible(e) and e.is_dir())


def _walk(folder: Path, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """(prefix + posix relative path, path) of the visible regular files below folder, at any
    depth like ImageFolder; symlinked folders are not followed (no loops, nothing outside)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _visible(entry):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), f"{prefix}{entry.name}/")
            elif entry.is_file():
                yield f"{prefix}{entry.name}", Path(entry.path)


def files_under(folder: Path) -> list[Path]:
    """Visible regular files below folder, sorted by relative path."""
    return [path for _, path in sorted(_walk(folder))]


# (posix path relative to the split root, absolute path, label)
_Item = tuple[str, Path, int]


def _scan(folder: Path, classes: tuple[str, ...]) -> list[_Item]:
    """Every file of every class sub-folder of folder."""
    present = _class_dirs(folder)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DatasetError(
            f"Folder {folder} has class folder(s) {unknown} not present in train; expected only classes {list(classes)}"
        )
    return [
        (rel, path, label)
        for label, name in enumerate(classes)
        if name in present
        for rel, path in _walk(folder / name, f"{name}/")
    ]


def _make_split(name: str, root: Path, classes: tuple[str, ...], items: list[_Item]) -> Split:
    items = sorted(items, key=lambda item: (classes[item[2]], item[0]))
    return Split(name, root, classes, tuple(path for _, path, _ in items), tuple(y for _, _, y in items))


def _held_out(relpaths: list[str], val_fraction: float, split_seed: int) -> set[str]:
    """The relpaths of one class that go to the val split. Each file is ranked by a hash of
    (seed, relpath), so the choice is reproducible on any machine and adding or removing a file
    moves at most a boundary file, not the whole split. Keeps >= 1 file on each side when the
    class has two or more."""
    n = len(relpaths)
    if n < 2:
        return set()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    ranked = sorted(relpaths, key=lambda r: hashlib.sha256(f"{split_seed}\0{r}".encode()).digest())
    return set(ranked[:n_val])


def _fraction_split(
    scan_root: Path, classes: tuple[str, ...], val_fraction: float, split_seed: int
) -> dict[str, Split]:
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"Invalid val_fraction {val_fraction}: expected a number between 0 and 1 (exclusive)")
    by_class: dict[int, list[_Item]] = {label: [] for label in range(len(classes))}
    for item in _scan(scan_root, classes):
        by_class[item[2]].append(item)
    train: list[_Item] = []
    val: list[_Item] = []
    for members in by_class.values():
        held = _held_out([rel for rel, _, _ in members], val_fraction, split_seed)
        for item in members:
            (val if item[0] in held else train).append(item)
    return {
        "train": _make_split("train", scan_root, classes, train),
        "val": _make_split("val", scan_root, classes, val),
    }


def resolve_folder(
    root: Path | str, spec: str | None = None, val_fraction: float = 0.2, split_seed: int = 0
) -> DatasetInfo:
    """Resolve an ImageFolder-style folder (see the module docstring) into a DatasetInfo."""
    given = spec if spec is not None else str(root)
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(
            f"Unknown dataset '{given}': not 'sample' or 'cifar10', and no such folder exists; {_EXPECTED}"
        )
    if not root.is_dir():
        raise DatasetError(f"Dataset '{given}' is a file, not a folder; {_EXPECTED}")
    root = root.resolve()
    top = _class_dirs(root)
    if not top:
        what = "is empty" if not any(_visible(p) for p in root.iterdir()) else "has no class subfolders"
        raise DatasetError(f"Dataset folder '{given}' {what}; {_EXPECTED}")
    eval_name = next((s for s in EVAL_SPLITS if s in top), None)
    if "train" in top:
        classes = tuple(_class_dirs(root / "train"))
        if not classes:
            raise DatasetError(f"Dataset folder '{given}' has train/ without class subfolders; {_EXPECTED}")
        if eval_name is None:
            splits = _fraction_split(root / "train", classes, val_fraction, split_seed)
        else:
            splits = {s: _make_split(s, root / s, classes, _scan(root / s, classes)) for s in ("train", eval_name)}
    elif eval_name is not None:
        raise DatasetError(f"Dataset folder '{given}' has {eval_name}/ but no train/; {_EXPECTED}")
    else:
        splits = _fraction_split(root, tuple(top), val_fraction, split_seed)
    for name, split in splits.items():
        if not len(split):
            raise DatasetError(f"Dataset folder '{given}' has no files in its {name} split; {_EXPECTED}")
    return DatasetInfo(given, root, splits["train"].classes, splits)


def decoded_cache_dir(data_dir: Path | str) -> Path:
    """The decoded-tensor cache folder of a data directory (`data.data_dir`)."""
    return Path(data_dir) / CACHE_SUBDIR


def resolve_dataset(
    spec: str,
    data_dir: Path | str = "data",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    download: bool = True,
    cifar10_url: str = CIFAR10_URL,
) -> DatasetInfo:
    """Resolve a dataset SPEC ('sample', 'cifar10' or a folder path) into its splits."""
    if spec == "sample":
        local = Path(data_dir) / "sample"
        root = local if local.is_dir() else BUNDLED_SAMPLE
    elif spec == "cifar10":
        root = prepare_cifar10(data_dir, url=cifar10_url, download=download)
    else:
        root = Path(spec)
    return resolve_folder(root, spec, val_fraction, split_seed)
