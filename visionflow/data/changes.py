"""The data a run used, file by file, and what changed between two runs.

Validation writes every run's listing (split, dataset-relative path, label, sha256, image size)
to `data_listing.csv.gz` in the run directory; a promoted champion keeps a copy beside its
weights. `diff_listings` compares two listings split by split: files added, removed, changed
(same path, other bytes) and relabelled (the same bytes under another class), per class.
`visionflow diff`, the `data-changes` artifact and the champion decision read it. No torch.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow.config import flatten
from visionflow.errors import ConfigError
from visionflow.fileio import atomic_write_bytes
from visionflow.tables import COUNT, TEXT, Table, markdown_table

LISTING_NAME = "data_listing.csv.gz"
LISTING_COLUMNS = ("split", "path", "label", "sha256", "size")
CHANGE_KINDS = ("added", "removed", "changed", "relabelled")
MAX_EXAMPLES = 10  # paths listed per split and kind


@dataclass(frozen=True)
class ListedFile:
    """One file a run used."""

    split: str
    path: str  # dataset-relative posix path, e.g. "train/ants/1.jpg"
    label: str  # class name
    sha256: str
    size: str  # "WxH"


def write_listing(files: Iterable[ListedFile], path: Path | str) -> Path:
    """Write the listing as gzip-compressed CSV, atomically; the same files give the same bytes."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(LISTING_COLUMNS)
    writer.writerows((f.split, f.path, f.label, f.sha256, f.size) for f in files)
    return atomic_write_bytes(path, gzip.compress(text.getvalue().encode(), mtime=0))


def read_listing(path: Path | str) -> list[ListedFile]:
    """The listing in `path`; a missing or unreadable file is a ConfigError naming it."""
    try:
        rows = list(csv.reader(io.StringIO(gzip.decompress(Path(path).read_bytes()).decode())))
    except FileNotFoundError:
        raise ConfigError(
            f"Data listing '{path}' not found: runs record it since the data-changes release; rerun to create it"
        ) from None
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"Data listing '{path}' is unreadable ({err}): expected a gzip CSV") from None
    if not rows or tuple(rows[0]) != LISTING_COLUMNS or any(len(row) != len(LISTING_COLUMNS) for row in rows[1:]):
        raise ConfigError(f"Data listing '{path}' is not a listing: expected the columns {', '.join(LISTING_COLUMNS)}")
    return [ListedFile(*row) for row in rows[1:]]


@dataclass
class SplitChanges:
    """What changed in one split: per kind (CHANGE_KINDS), images per class and a few paths."""

    before: int  # images
    after: int
    counts: dict[str, Counter] = field(default_factory=lambda: {kind: Counter() for kind in CHANGE_KINDS})
    examples: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in CHANGE_KINDS})

    def add(self, kind: str, label: str, example: str) -> None:
        self.counts[kind][label] += 1
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(example)

    def total(self, kind: str) -> int:
        return sum(self.counts[kind].values())

    @property
    def unchanged(self) -> bool:
        return not any(self.counts[kind] for kind in CHANGE_KINDS)

    def summary(self) -> str:
        """'+1,204 images, 3 relabelled' or 'unchanged'."""
        parts = [
            f"+{self.total('added'):,} images" if self.total("added") else "",
            f"-{self.total('removed'):,} images" if self.total("removed") else "",
            f"{self.total('changed'):,} changed" if self.total("changed") else "",
            f"{self.total('relabelled'):,} relabelled" if self.total("relabelled") else "",
        ]
        return ", ".join(part for part in parts if part) or "unchanged"


def diff_listings(before: Sequence[ListedFile], after: Sequence[ListedFile]) -> dict[str, SplitChanges]:
    """Split name -> what changed from `before` to `after`. A path in both with other bytes is
    changed; the same bytes leaving one class and arriving in another of the same split are
    relabelled (counted under the new class; the example reads 'old -> new'); a file renamed
    within its class is not a change; everything else is added (new class) or removed (old class)."""
    splits: dict[str, SplitChanges] = {}
    for name in sorted({f.split for f in before} | {f.split for f in after}):
        old = {f.path: f for f in before if f.split == name}
        new = {f.path: f for f in after if f.split == name}
        changes = splits[name] = SplitChanges(before=len(old), after=len(new))
        for path in sorted(old.keys() & new.keys()):
            if old[path].sha256 != new[path].sha256:
                changes.add("changed", new[path].label, path)
        gone = {}  # sha256 -> files that left
        for path in sorted(old.keys() - new.keys()):
            gone.setdefault(old[path].sha256, []).append(old[path])
        for path in sorted(new.keys() - old.keys()):
            arrived = new[path]
            moved = gone.get(arrived.sha256)
            if moved:
                source = moved.pop(0)
                if source.label != arrived.label:
                    changes.add("relabelled", arrived.label, f"{source.path} -> {path}")
            else:
                changes.add("added", arrived.label, path)
        for left in gone.values():
            for source in left:
                changes.add("removed", source.label, source.path)
    return splits


def summary_line(changes: Mapping[str, SplitChanges], train_split: str = "train") -> str:
    """One line for a decision: 'trained on +1,204 images, 3 relabelled; val split unchanged'."""
    parts = [
        f"trained on {changes[name].summary()}" if name == train_split else f"{name} split {changes[name].summary()}"
        for name in sorted(changes, key=lambda name: (name != train_split, name))
    ]
    return "; ".join(parts)


def changes_to_dict(changes: Mapping[str, SplitChanges]) -> dict[str, Any]:
    """JSON-ready: per split, image counts before/after and per kind the images per class and examples."""
    return {
        name: {
            "before": split.before,
            "after": split.after,
            **{
                kind: {
                    "total": split.total(kind),
                    "classes": dict(split.counts[kind]),
                    "examples": split.examples[kind],
                }
                for kind in CHANGE_KINDS
            },
        }
        for name, split in changes.items()
    }


def config_differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Dotted config key -> [before, after] for every value that differs (a key missing on one
    side is None there); where outputs are written (`output.*`) is left out."""
    old, new = flatten(before), flatten(after)
    return {
        key: [old.get(key), new.get(key)]
        for key in sorted(old.keys() | new.keys())
        if not key.startswith("output.") and old.get(key) != new.get(key)
    }


def changes_markdown(changes: Mapping[str, SplitChanges], title: str) -> str:
    """The data changes as markdown: one table per split of the changed classes, and examples."""
    parts = [f"# {title}", "", summary_line(changes) + "."]
    for name, split in changes.items():
        parts += ["", f"## {name}: {split.before:,} -> {split.after:,} images ({split.summary()})"]
        if split.unchanged:
            continue
        labels = sorted(set().union(*(split.counts[kind] for kind in CHANGE_KINDS)))
        rows = tuple((label, *(split.counts[kind][label] for kind in CHANGE_KINDS)) for label in labels)
        parts += ["", markdown_table(Table(("class", *CHANGE_KINDS), rows, (TEXT, *[COUNT] * len(CHANGE_KINDS))))]
        for kind in CHANGE_KINDS:
            if split.examples[kind]:
                shown = ", ".join(f"`{example}`" for example in split.examples[kind])
                more = split.total(kind) - len(split.examples[kind])
                parts += ["", f"{kind}: {shown}" + (f" and {more:,} more" if more else "")]
    return "\n".join(parts) + "\n"
