"""Dataset validation: counts per split and class, image sizes and modes, invalid files, empty
classes, class imbalance, and exact duplicates within a split and across splits (train/eval
leakage). Every file is read once, on a thread pool; the same pass yields the fingerprint.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from visionflow.data import DatasetInfo, Split
from visionflow.errors import ConfigError, DatasetError
from visionflow.fileio import file_sha256
from visionflow.fingerprint import combine_fingerprints, fingerprint_from_digests
from visionflow.images import UnreadableImage, is_image_file, open_image, thread_map, to_rgb

ON_INVALID = ("skip", "fail")


@dataclass(frozen=True)
class FileCheck:
    """What one pass over a file found: its digest, and either image facts or why it is invalid."""

    sha256: str
    size: str | None = None  # "WxH"
    mode: str | None = None  # original pixel mode, before conversion to RGB
    pixels: str | None = None  # sha256 of mode + size + RGB pixel bytes: equal for exact duplicates
    reason: str | None = None  # set when the file is invalid


@dataclass(frozen=True)
class SplitReport:
    images: int
    classes: dict[str, int]
    sizes: dict[str, int]  # "WxH" -> count, most common first
    modes: dict[str, int]
    empty_classes: tuple[str, ...]
    imbalance: float | None  # largest / smallest class; None when a class is empty

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "classes": self.classes,
            "sizes": self.sizes,
            "modes": self.modes,
            "empty_classes": list(self.empty_classes),
            "imbalance": self.imbalance,
        }


@dataclass(frozen=True)
class ValidationReport:
    """Findings of validate_dataset; paths are dataset-relative posix paths."""

    spec: str
    root: str
    fingerprint: str  # of the dataset with invalid files left out
    classes: tuple[str, ...]
    splits: dict[str, SplitReport]
    invalid: tuple[tuple[str, str], ...]  # (path, reason)
    duplicates_within: tuple[tuple[str, ...], ...]  # groups of identical images in one split
    duplicates_across: tuple[tuple[str, str], ...]  # (train path, eval path) pairs: leakage

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with keys fingerprint, splits, invalid, duplicates, and more."""
        return {
            "spec": self.spec,
            "root": self.root,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "splits": {name: split.to_dict() for name, split in self.splits.items()},
            "invalid": [{"path": path, "reason": reason} for path, reason in self.invalid],
            "duplicates": {
                "within_split": [list(group) for group in self.duplicates_within],
                "across_splits": [list(pair) for pair in self.duplicates_across],
            },
        }

    def format_text(self) -> str:
        """A readable multi-line summary for terminals."""
        lines = [
            f"dataset {self.spec} ({self.root})",
            f"fingerprint {self.fingerprint}",
            f"{len(self.classes)} classes: {', '.join(self.classes)}",
        ]
        for name, split in self.splits.items():
            ratio = "n/a (empty class)" if split.imbalance is None else f"{split.imbalance:.2f}"
            lines.append(f"{name}: {split.images} images, imbalance max/min {ratio}")
            lines.append("  per class: " + ", ".join(f"{c} {n}" for c, n in split.classes.items()))
            lines.append("  sizes: " + _top(split.sizes) + "; modes: " + _top(split.modes))
            if split.empty_classes:
                lines.append("  empty classes: " + ", ".join(split.empty_classes))
        lines.append(f"invalid files (left out): {len(self.invalid)}")
        lines += [f"  {path}: {reason}" for path, reason in self.invalid]
        lines.append(f"duplicate groups within a split: {len(self.duplicates_within)}")
        lines += ["  " + " = ".join(group) for group in self.duplicates_within]
        lines.append(f"duplicates across splits (train/eval leakage): {len(self.duplicates_across)}")
        lines += [f"  {a} = {b}" for a, b in self.duplicates_across]
        return "\n".join(lines)


def _top(counts: dict[str, int], limit: int = 5) -> str:
    shown = ", ".join(f"{key} x{n}" for key, n in list(counts.items())[:limit])
    more = len(counts) - limit
    return shown + (f" (+{more} more)" if more > 0 else "")


def check_file(path: Path) -> FileCheck:
    """Read and fully decode one file (thread-safe)."""
    try:
        digest = file_sha256(path)
    except OSError as err:  # e.g. deleted or unreadable since the dataset was resolved
        return FileCheck("", reason=f"cannot read file: {err.strerror or err}")
    if not is_image_file(path):
        return FileCheck(digest, reason=f"not an image (extension '{path.suffix}')")
    try:
        image = open_image(path)
        rgb = to_rgb(image, path)
    except UnreadableImage as err:
        return FileCheck(digest, reason=err.reason)
    width, height = rgb.size
    pixels = hashlib.sha256(f"{rgb.mode}\0{width}x{height}\0".encode())
    pixels.update(rgb.tobytes())
    return FileCheck(digest, f"{width}x{height}", image.mode, pixels.hexdigest())


def _split_report(split: Split, checks: list[FileCheck]) -> SplitReport:
    counts = split.class_counts()
    empty = tuple(c for c, n in counts.items() if n == 0)
    imbalance = None if empty else round(max(counts.values()) / min(counts.values()), 4)
    return SplitReport(
        len(split),
        counts,
        dict(Counter(c.size for c in checks).most_common()),
        dict(Counter(c.mode for c in checks).most_common()),
        empty,
        imbalance,
    )


def _duplicates(
    paths: dict[str, list[str]], pixels: dict[str, list[str]], eval_name: str
) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, str], ...]]:
    """Within-split groups and (train, eval) leakage pairs from per-split path/pixel-hash lists."""
    within = []
    for name in paths:
        groups: dict[str, list[str]] = defaultdict(list)
        for path, key in zip(paths[name], pixels[name]):
            groups[key].append(path)
        within += [tuple(group) for group in groups.values() if len(group) > 1]
    first_in_train = {}
    for path, key in zip(paths["train"], pixels["train"]):
        first_in_train.setdefault(key, path)
    across = tuple(
        (first_in_train[key], path) for path, key in zip(paths[eval_name], pixels[eval_name]) if key in first_in_train
    )
    return tuple(sorted(within)), across


def _report_paths(info: DatasetInfo, split: Split) -> list[str]:
    """Dataset-relative posix paths ("train/ants/x.jpg") of a split's files, in order."""
    prefix = split.root.relative_to(info.root).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    return [prefix + split.relpath(i) for i in range(len(split))]


def _without(info: DatasetInfo, bad: set[Path]) -> DatasetInfo:
    """info without the bad files; a split left empty is an error (nothing to train/evaluate on)."""
    splits = {name: split.without(bad) for name, split in info.splits.items()}
    for name, split in splits.items():
        if not len(split):
            raise DatasetError(
                f"Split '{name}' of dataset '{info.spec}' has no readable images; "
                f"expected at least one valid image per split"
            )
    return replace(info, splits=splits)


def validate_dataset(info: DatasetInfo, on_invalid: str = "skip") -> tuple[ValidationReport, DatasetInfo]:
    """Check every file of every split. Returns the report and the dataset without invalid files
    (on_invalid="skip"); with on_invalid="fail" the first invalid file (train first, then path
    order) raises DatasetError naming it."""
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"Invalid on_invalid '{on_invalid}'. Choose from: {', '.join(ON_INVALID)}")
    order = ["train"] + [name for name in info.splits if name != "train"]
    checks = {name: thread_map(check_file, info.splits[name].files) for name in order}
    paths = {name: _report_paths(info, info.splits[name]) for name in order}
    invalid = [
        (paths[name][i], check.reason, info.splits[name].files[i])
        for name in order
        for i, check in enumerate(checks[name])
        if check.reason is not None
    ]
    if invalid and on_invalid == "fail":
        path, reason, _ = invalid[0]
        raise DatasetError(
            f"Invalid image '{path}' in dataset '{info.spec}': {reason} "
            f"(on_invalid='fail'; use 'skip' to leave invalid files out)"
        )
    clean = _without(info, {file for _, _, file in invalid})
    valid = {name: [c for c in checks[name] if c.reason is None] for name in order}
    valid_paths = {name: [p for p, c in zip(paths[name], checks[name]) if c.reason is None] for name in order}
    within, across = _duplicates(
        valid_paths, {name: [c.pixels for c in valid[name]] for name in order}, clean.eval_split.name
    )
    fingerprints = {
        name: fingerprint_from_digests(clean.splits[name], [c.sha256 for c in valid[name]]) for name in order
    }
    report = ValidationReport(
        spec=info.spec,
        root=str(info.root),
        fingerprint=combine_fingerprints(fingerprints),
        classes=info.classes,
        splits={name: _split_report(clean.splits[name], valid[name]) for name in order},
        invalid=tuple((path, reason) for path, reason, _ in invalid),
        duplicates_within=within,
        duplicates_across=across,
    )
    return report, clean
