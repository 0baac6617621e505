from __future__ import annotations

import json
import shutil

import pytest

from visionflow.data.fingerprint import fingerprint_dataset
from visionflow.data.splits import resolve_dataset, resolve_folder
from visionflow.data.validate import validate_dataset
from visionflow.errors import ConfigError, DatasetError


@pytest.fixture
def broken(folder_dataset, image_writer):
    """folder_dataset plus one file of every kind of invalid, and odd modes that are valid."""
    cat, dog = folder_dataset / "train" / "cat", folder_dataset / "train" / "dog"
    truncated = image_writer(cat / "truncated.jpg", size=(64, 64), seed=99)
    truncated.write_bytes(truncated.read_bytes()[:300])
    (cat / "zero.jpg").write_bytes(b"")
    (dog / "text.jpg").write_text("this is not a JPEG\n")
    (dog / "notes.txt").write_text("a stray file\n")
    image_writer(dog / "gray.png", mode="L", seed=50)
    image_writer(dog / "deep.png", mode="I;16", seed=51)
    image_writer(dog / "ink.jpg", mode="CMYK", seed=52, fmt="JPEG")
    image_writer(dog / "alpha.png", mode="RGBA", seed=53)
    image_writer(dog / "pal.png", mode="P", seed=54)
    return folder_dataset


def test_invalid_files_are_reported_and_skipped(broken):
    info = resolve_folder(broken)
    report, clean = validate_dataset(info)
    assert dict(report.invalid) == {
        "train/cat/truncated.jpg": "truncated image data",
        "train/cat/zero.jpg": "empty file",
        "train/dog/notes.txt": "not an image (extension '.txt')",
        "train/dog/text.jpg": "not a recognised image format",
    }
    assert len(clean.train) == len(info.train) - 4 and clean.eval_split == info.eval_split
    assert report.splits["train"].images == 4 + 4 + 5
    assert report.splits["train"].classes == {"cat": 4, "dog": 9}
    assert report.splits["train"].modes == {"RGB": 8, "L": 1, "I;16": 1, "CMYK": 1, "RGBA": 1, "P": 1}
    assert report.splits["train"].sizes == {"12x10": 13}
    assert report.fingerprint == fingerprint_dataset(clean) != fingerprint_dataset(info)


def test_fail_policy_names_the_first_invalid_file(broken):
    with pytest.raises(DatasetError, match=r"'train/cat/truncated.jpg'.*truncated image data"):
        validate_dataset(resolve_folder(broken), on_invalid="fail")


def test_unknown_policy_lists_choices(folder_dataset):
    with pytest.raises(ConfigError, match="Choose from: skip, fail"):
        validate_dataset(resolve_folder(folder_dataset), on_invalid="ignore")


def test_clean_dataset_passes_fail_policy(folder_dataset):
    report, clean = validate_dataset(resolve_folder(folder_dataset), on_invalid="fail")
    assert report.invalid == () and clean == resolve_folder(folder_dataset)


def test_duplicates_within_and_across_splits(folder_dataset):
    train_cat = folder_dataset / "train" / "cat"
    shutil.copy(train_cat / "0.png", train_cat / "0_copy.png")
    shutil.copy(train_cat / "0.png", folder_dataset / "train" / "dog" / "same_as_cat0.png")
    shutil.copy(train_cat / "1.png", folder_dataset / "val" / "cat" / "leak.png")
    report, _ = validate_dataset(resolve_folder(folder_dataset))
    assert report.duplicates_within == (("train/cat/0.png", "train/cat/0_copy.png", "train/dog/same_as_cat0.png"),)
    assert report.duplicates_across == (("train/cat/1.png", "val/cat/leak.png"),)
    as_dict = report.to_dict()["duplicates"]
    assert as_dict == {
        "within_split": [["train/cat/0.png", "train/cat/0_copy.png", "train/dog/same_as_cat0.png"]],
        "across_splits": [["train/cat/1.png", "val/cat/leak.png"]],
    }


def test_duplicates_are_pixel_equal_not_byte_equal(folder_dataset):
    from PIL import Image

    with Image.open(folder_dataset / "train" / "cat" / "2.png") as image:
        image.save(folder_dataset / "val" / "dog" / "recompressed.png", compress_level=0)
    report, _ = validate_dataset(resolve_folder(folder_dataset))
    assert report.duplicates_across == (("train/cat/2.png", "val/dog/recompressed.png"),)


def test_empty_class_and_imbalance(folder_dataset, image_writer):
    for i in range(4):
        image_writer(folder_dataset / "train" / "dog" / f"extra{i}.png", seed=100 + i)
    shutil.rmtree(folder_dataset / "val" / "dog")
    (folder_dataset / "val" / "dog").mkdir()
    report, _ = validate_dataset(resolve_folder(folder_dataset))
    assert report.splits["train"].imbalance == 2.0 and report.splits["train"].empty_classes == ()
    assert report.splits["val"].empty_classes == ("dog",) and report.splits["val"].imbalance is None


def test_split_with_only_invalid_files_is_an_error(folder_dataset):
    for path in (folder_dataset / "val").rglob("*.png"):
        path.write_bytes(b"")
    with pytest.raises(DatasetError, match="Split 'val'.*no readable images"):
        validate_dataset(resolve_folder(folder_dataset))


def test_report_is_json_and_readable(broken):
    report, _ = validate_dataset(resolve_folder(broken))
    data = json.loads(json.dumps(report.to_dict()))
    assert {"fingerprint", "splits", "invalid", "duplicates"} <= set(data)
    assert data["splits"]["val"] == {
        "images": 4,
        "classes": {"cat": 2, "dog": 2},
        "sizes": {"12x10": 4},
        "modes": {"RGB": 4},
        "empty_classes": [],
        "imbalance": 1.0,
    }
    assert {"path": "train/cat/zero.jpg", "reason": "empty file"} in data["invalid"]
    text = report.format_text()
    assert "train: 13 images" in text and "train/cat/zero.jpg: empty file" in text


def test_real_hymenoptera(hymenoptera):
    report, clean = validate_dataset(resolve_dataset(str(hymenoptera)))
    assert report.invalid == ()
    assert {n: s.classes for n, s in report.splits.items()} == {
        "train": {"ants": 124, "bees": 121},
        "val": {"ants": 70, "bees": 83},
    }
    assert sum(report.splits["train"].modes.values()) == 245
    assert report.fingerprint == fingerprint_dataset(clean)
