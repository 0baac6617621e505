from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from visionflow.data.fingerprint import fingerprint_dataset, fingerprint_split
from visionflow.data.splits import resolve_folder
from visionflow.fileio import file_sha256


def fingerprints(root: Path) -> tuple[str, str]:
    info = resolve_folder(root)
    return fingerprint_dataset(info), fingerprint_split(info.train)


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 100_000)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"abc" * 100_000).hexdigest()


def test_format_and_determinism(cifar_subset):
    dataset, train = fingerprints(cifar_subset)
    assert len(dataset) == len(train) == 64 and int(dataset, 16) >= 0
    assert fingerprints(cifar_subset) == (dataset, train)


def test_independent_of_location(cifar_subset, tmp_path):
    moved = shutil.copytree(cifar_subset, tmp_path / "elsewhere" / "renamed_root")
    assert fingerprints(moved) == fingerprints(cifar_subset)


def test_one_changed_byte(cifar_subset):
    before = fingerprints(cifar_subset)
    victim = cifar_subset / "train" / "cat" / sorted(p.name for p in (cifar_subset / "train" / "cat").iterdir())[2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    after = fingerprints(cifar_subset)
    assert after[0] != before[0] and after[1] != before[1]


@pytest.mark.parametrize("change", ["add", "remove", "rename", "move_label"])
def test_file_set_changes(cifar_subset, change):
    before = fingerprints(cifar_subset)
    cat = cifar_subset / "train" / "cat"
    first = sorted(cat.iterdir())[0]
    if change == "add":
        shutil.copy(first, cat / "copy.jpg")
    elif change == "remove":
        first.unlink()
    elif change == "rename":
        first.rename(cat / "renamed.jpg")
    else:  # same bytes, same file name, other class: the label moved
        first.rename(cifar_subset / "train" / "dog" / first.name)
    after = fingerprints(cifar_subset)
    assert after[0] != before[0] and after[1] != before[1]


def test_eval_split_change_changes_only_the_dataset_fingerprint(cifar_subset):
    before = fingerprints(cifar_subset)
    sorted((cifar_subset / "val" / "cat").iterdir())[0].unlink()
    after = fingerprints(cifar_subset)
    assert after[1] == before[1] and after[0] != before[0]


def test_class_list_is_part_of_the_identity(cifar_subset):
    # An extra empty class shifts label indices, so cached labels must not be reused.
    before = fingerprints(cifar_subset)
    (cifar_subset / "train" / "aardvark").mkdir()
    assert fingerprints(cifar_subset)[1] != before[1]
