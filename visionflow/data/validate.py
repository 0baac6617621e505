"""Dataset validation: counts per split and class, image sizes and modes, invalid files, empty
classes, class imbalance, and exact duplicates within a split and across splits (train/eval
leakage); optionally near-duplicates (`visionflow.data.near_duplicates`: re-encoded, resized, cropped,
brightened or mirrored copies) from thumbnails made in the same pass. Every file is read once, on
a thread pool; the same pass yields the fingerprint.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, get_args

import numpy as np

from visionflow.config import NEAR_DUPLICATE_THRESHOLD, OnInvalid, OnLeak
from visionflow.data.changes import ListedFile
from visionflow.data.fingerprint import combine_fingerprints, fingerprint_from_digests
from visionflow.data.images import UnreadableImage, is_image_file, open_image, thread_map, to_rgb
from visionflow.data.near_duplicates import NearDuplicateReport, near_duplicate_report, thumbnail
from visionflow.data.splits import DatasetInfo, Split
from visionflow.errors import ConfigError, DatasetError
from visionflow.fileio import file_sha256

ON_INVALID = get_args(OnInvalid)  # data.on_invalid's choices
ON_LEAK = get_args(OnLeak)  # data.on_leak's choices


@dataclass(frozen=True)
class FileCheck:
    """What one pass over a file found: its digest, and either image facts or why it is invalid."""

    sha256: str
    size: str | None = None  # "WxH"
    mode: str | None = None  # original pixel mode, before conversion to RGB
    pixels: str | None = None  # sha256 of mode + size + RGB pixel bytes: equal for exact duplicates
    reason: str | None = None  # set when the file is invalid
    thumb: np.ndarray | None = field(default=None, compare=False, repr=False)  # for near-duplicates


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
    near_duplicates: NearDuplicateReport | None = None  # when searched
    dropped: tuple[str, ...] = ()  # leaked eval images left out (on_leak="drop-eval")
    listing: tuple[ListedFile, ...] = ()  # every file of the returned dataset (not in to_dict: one row per file)

    def warnings(self) -> list[str]:
        """One line per finding a run should warn about: invalid files left out, leaked eval images."""
        lines = []
        if self.invalid:
            shown = ", ".join(path for path, _ in self.invalid[:5])
            lines.append(f"{len(self.invalid)} invalid file(s) left out: {shown}")
        near = self.near_duplicates
        if near is not None and near.across:
            lines.append(
                f"{len(near.leaked_eval)} of {near.eval_images} {near.eval_split} images have a "
                f"near-duplicate in train ({len(self.dropped)} left out)"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with keys fingerprint, splits, invalid, duplicates, and more; with
        near-duplicates searched, `near_duplicates` ({"within_split": [[path, ...]],
        "across_splits": [{"train", "eval", "score"}]}) and `near_duplicate_summary`."""
        near = {}
        if self.near_duplicates is not None:
            near = {
                "near_duplicates": self.near_duplicates.to_dict(),
                "near_duplicate_summary": {**self.near_duplicates.summary(), "dropped": list(self.dropped)},
            }
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
            **near,
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
        if self.near_duplicates is not None:
            lines += self.near_duplicates.format_lines()
            if self.dropped:
                lines.append(
                    f"  left out of {self.near_duplicates.eval_split} (on_leak=drop-eval): {len(self.dropped)}"
                )
        return "\n".join(lines)


def _top(counts: dict[str, int], limit: int = 5) -> str:
    shown = ", ".join(f"{key} x{n}" for key, n in list(counts.items())[:limit])
    more = len(counts) - limit
    return shown + (f" (+{more} more)" if more > 0 else "")


def check_file(path: Path, thumbnails: bool = False) -> FileCheck:
    """Read and fully decode one file (thread-safe); with `thumbnails`, keep its near-duplicate
    thumbnail too."""
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
    thumb = thumbnail(rgb) if thumbnails else None
    return FileCheck(digest, f"{width}x{height}", image.mode, pixels.hexdigest(), thumb=thumb)


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


def _near_duplicates(
    info: DatasetInfo,
    valid: dict[str, list[FileCheck]],
    valid_paths: dict[str, list[str]],
    threshold: float,
    on_leak: str,
) -> tuple[NearDuplicateReport, DatasetInfo]:
    """The near-duplicate report of the valid files, and `info` without the leaked eval images
    (on_leak="drop-eval") or unchanged ("report"); on_leak="fail" raises DatasetError on leakage."""
    eval_name = info.eval_split.name
    split_classes = {
        name: [info.classes[label] for label in info.splits[name].labels] for name in valid_paths
    }  # info holds the valid files only, in the same order
    report = near_duplicate_report(
        {name: np.stack([c.thumb for c in checks]) for name, checks in valid.items()},
        valid_paths,
        split_classes,
        eval_name,
        threshold,
    )
    leaked = report.leaked_eval
    if leaked and on_leak == "fail":
        shown = ", ".join(leaked[:3]) + (", ..." if len(leaked) > 3 else "")
        raise DatasetError(
            f"{len(leaked)} of {report.eval_images} {eval_name} images of dataset '{info.spec}' have a near-duplicate "
            f"in train (score >= {threshold}): {shown} (on_leak='fail'; use 'drop-eval' to evaluate without them)"
        )
    if leaked and on_leak == "drop-eval":
        info = _without(info, {info.root / path for path in leaked})
    return report, info


def _check_options(on_invalid: str, on_leak: str, threshold: float) -> None:
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"Invalid on_invalid '{on_invalid}'. Choose from: {', '.join(ON_INVALID)}")
    if on_leak not in ON_LEAK:
        raise ConfigError(f"Invalid on_leak '{on_leak}'. Choose from: {', '.join(ON_LEAK)}")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"Invalid near-duplicate threshold {threshold}: expected a correlation in (0, 1]")


def _listing(clean: DatasetInfo, valid: dict[str, list[FileCheck]], order: list[str]) -> tuple[ListedFile, ...]:
    """Every valid file of `clean` (split order, then path order) with its class, digest and size."""
    return tuple(
        ListedFile(name, path, split.classes[split.labels[i]], check.sha256, check.size)
        for name in order
        for split in [clean.splits[name]]
        for i, (path, check) in enumerate(zip(_report_paths(clean, split), valid[name]))
    )


def validate_dataset(
    info: DatasetInfo,
    on_invalid: str = "skip",
    near_duplicates: bool = False,
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
    on_leak: str = "report",
) -> tuple[ValidationReport, DatasetInfo]:
    """Check every file of every split. Returns the report and the dataset without invalid files
    (on_invalid="skip"); with on_invalid="fail" the first invalid file (train first, then path
    order) raises DatasetError naming it. With `near_duplicates`, also search near-duplicates at
    `threshold`; eval images with one in train are reported (on_leak="report"), left out of the
    returned dataset ("drop-eval") or raise DatasetError ("fail")."""
    _check_options(on_invalid, on_leak, threshold)
    order = ["train"] + [name for name in info.splits if name != "train"]
    check = partial(check_file, thumbnails=near_duplicates)
    checks = {name: thread_map(check, info.splits[name].files) for name in order}
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
    near, dropped = None, ()
    if near_duplicates:
        near, without_leaked = _near_duplicates(clean, valid, valid_paths, threshold, on_leak)
        if without_leaked is not clean:  # drop-eval: the leaked eval images are left out like invalid files
            dropped, clean = near.leaked_eval, without_leaked
            left_out = set(dropped)
            valid = {name: [c for c, p in zip(valid[name], valid_paths[name]) if p not in left_out] for name in order}
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
        near_duplicates=near,
        dropped=dropped,
        listing=_listing(clean, valid, order),
    )
    return report, clean
