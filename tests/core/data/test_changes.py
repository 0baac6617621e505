"""Data listings and what changed between two: a folder dataset validated, modified (a file
added, one removed, one rewritten, one moved to another class, one renamed in its class),
validated again."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from tests.helpers import write_image
from visionflow.data.changes import (
    ListedFile,
    changes_markdown,
    changes_to_dict,
    config_differences,
    diff_listings,
    read_listing,
    summary_line,
    write_listing,
)
from visionflow.data.splits import resolve_dataset
from visionflow.data.validate import validate_dataset
from visionflow.errors import ConfigError


def listing_of(root: Path) -> tuple[ListedFile, ...]:
    report, _ = validate_dataset(resolve_dataset(str(root), download=False))
    return report.listing


def test_the_listing_names_every_file_used_and_round_trips(folder_dataset: Path, tmp_path: Path) -> None:
    (folder_dataset / "train" / "cat" / "broken.png").write_bytes(b"not an image")  # left out: not used
    listing = listing_of(folder_dataset)
    assert len(listing) == 12 and {f.split for f in listing} == {"train", "val"}
    first = next(f for f in listing if f.path == "train/cat/0.png")
    assert (first.split, first.label, len(first.sha256), first.size) == ("train", "cat", 64, "12x10")
    assert not any("broken" in f.path for f in listing)

    path = write_listing(listing, tmp_path / "data_listing.csv.gz")
    assert read_listing(path) == list(listing)
    assert write_listing(listing, tmp_path / "again.csv.gz").read_bytes() == path.read_bytes()  # no timestamp
    assert gzip.decompress(path.read_bytes()).decode().splitlines()[0] == "split,path,label,sha256,size"


def test_every_kind_of_change_per_split_and_class(folder_dataset: Path) -> None:
    before = listing_of(folder_dataset)
    train = folder_dataset / "train"
    write_image(train / "dog" / "new.png", seed=99)  # added
    (train / "cat" / "3.png").unlink()  # removed
    write_image(train / "dog" / "0.png", seed=98)  # changed: same path, other pixels
    (train / "cat" / "1.png").rename(train / "dog" / "was-a-cat.png")  # relabelled: same bytes, other class
    (train / "cat" / "2.png").rename(train / "cat" / "renamed.png")  # renamed in its class: no change
    changes = diff_listings(before, listing_of(folder_dataset))

    assert changes["val"].unchanged and changes["val"].summary() == "unchanged"
    values = changes_to_dict(changes)["train"]
    assert (values["before"], values["after"]) == (8, 8)
    assert {kind: values[kind]["classes"] for kind in ("added", "removed", "changed", "relabelled")} == {
        "added": {"dog": 1},
        "removed": {"cat": 1},
        "changed": {"dog": 1},
        "relabelled": {"dog": 1},
    }
    assert values["relabelled"]["examples"] == ["train/cat/1.png -> train/dog/was-a-cat.png"]
    assert values["removed"]["examples"] == ["train/cat/3.png"]
    line = "trained on +1 images, -1 images, 1 changed, 1 relabelled; val split unchanged"
    assert summary_line(changes) == line
    markdown = changes_markdown(changes, "Data changes against run a")
    assert markdown.startswith("# Data changes against run a\n\n" + line)
    assert "| dog | 1 | 0 | 1 | 1 |" in markdown and "| cat | 0 | 1 | 0 | 0 |" in markdown


def test_an_unreadable_listing_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_listing(tmp_path / "missing.csv.gz")
    (tmp_path / "plain.csv.gz").write_text("split,path\n")
    with pytest.raises(ConfigError, match="unreadable") as err:
        read_listing(tmp_path / "plain.csv.gz")
    assert "\n" not in str(err.value)
    (tmp_path / "other.csv.gz").write_bytes(gzip.compress(b"a,b\n1,2\n"))
    with pytest.raises(ConfigError, match="expected the columns split, path, label, sha256, size"):
        read_listing(tmp_path / "other.csv.gz")


def test_config_differences_leave_outputs_out() -> None:
    before = {"optim": {"lr": 0.1}, "data": {"mean": [0.5]}, "output": {"run_name": "a"}}
    after = {"optim": {"lr": 0.2}, "data": {"mean": [0.5], "augment": True}, "output": {"run_name": "b"}}
    assert config_differences(before, after) == {"data.augment": [None, True], "optim.lr": [0.1, 0.2]}
