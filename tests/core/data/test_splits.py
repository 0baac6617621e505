from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset

from visionflow.data.folders import FolderDataset, LabelFolder
from visionflow.data.splits import resolve_dataset, resolve_folder
from visionflow.errors import DatasetError

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_hymenoptera_imagefolder_layout(hymenoptera):
    info = resolve_dataset(str(hymenoptera))
    assert info.spec == str(hymenoptera) and info.root == hymenoptera.resolve()
    assert info.classes == ("ants", "bees") and list(info.splits) == ["train", "val"]
    assert info.train.class_counts() == {"ants": 124, "bees": 121}
    assert info.eval_split.name == "val" and info.eval_split.class_counts() == {"ants": 70, "bees": 83}
    train = info.train
    assert train.root == hymenoptera.resolve() / "train"
    assert all(f.is_absolute() for f in train.files) and len(train.labels) == len(train) == 245
    keys = [(train.classes[y], train.relpath(i)) for i, y in enumerate(train.labels)]
    assert keys == sorted(keys) and train.relpath(0).startswith("ants/")


def test_cifar_mini_layout(cifar_mini):
    info = resolve_dataset(str(cifar_mini))
    assert info.classes == CIFAR_CLASSES
    assert info.train.class_counts() == dict.fromkeys(CIFAR_CLASSES, 500)
    assert info.eval_split.class_counts() == dict.fromkeys(CIFAR_CLASSES, 100)


def test_sample_spec_resolves_bundled_sample(tmp_path):
    # tmp_path has no sample/: the copy bundled beside the package is used
    info = resolve_dataset("sample", data_dir=tmp_path)
    assert info.spec == "sample" and info.classes == CIFAR_CLASSES
    assert len(info.train) > 0 and len(info.eval_split) > 0


def test_label_folder_is_the_tutorial_dataset(hymenoptera):
    root = hymenoptera / "train"
    ants, bees = LabelFolder(root, "ants"), LabelFolder(root, "bees")
    assert (len(ants), len(bees)) == (124, 121)
    image, label = ants[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == "ants"
    both = ants + bees
    assert isinstance(both, ConcatDataset) and len(both) == 245
    assert both[124][1] == "bees" and both[123][1] == "ants"
    assert len(LabelFolder(hymenoptera / "val", "bees")) == 83


def test_label_folder_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="wasps"):
        LabelFolder(tmp_path, "wasps")


def test_folder_dataset_applies_transform(folder_dataset):
    split = resolve_folder(folder_dataset).train
    plain = FolderDataset(split)
    image, label = plain[5]
    assert isinstance(image, Image.Image) and label == 1 and len(plain) == 8
    tensors = FolderDataset(split, transform=lambda im: torch.tensor(list(im.size)))
    assert tensors[0][0].tolist() == [12, 10] and tensors[0][1] == 0


def test_test_split_is_used_when_there_is_no_val(folder_dataset):
    (folder_dataset / "val").rename(folder_dataset / "test")
    info = resolve_folder(folder_dataset)
    assert list(info.splits) == ["train", "test"] and info.eval_split.name == "test"


def test_flat_layout_is_split_stratified_and_seeded(tmp_path, image_writer):
    for name, n in (("a", 20), ("b", 10)):
        for i in range(n):
            image_writer(tmp_path / "flat" / name / f"{i:02d}.png", size=(2, 2), seed=i)
    info = resolve_folder(tmp_path / "flat", val_fraction=0.2, split_seed=0)
    assert info.train.class_counts() == {"a": 16, "b": 8}
    assert info.eval_split.class_counts() == {"a": 4, "b": 2}
    assert info.train.root == info.eval_split.root == (tmp_path / "flat").resolve()
    assert info.train.relpath(0).startswith("a/")
    assert not set(info.train.files) & set(info.eval_split.files)
    again = resolve_folder(tmp_path / "flat", val_fraction=0.2, split_seed=0)
    assert again.eval_split.files == info.eval_split.files
    other = resolve_folder(tmp_path / "flat", val_fraction=0.2, split_seed=1)
    assert other.eval_split.files != info.eval_split.files
    assert len(resolve_folder(tmp_path / "flat", val_fraction=0.5).eval_split) == 15


def test_flat_split_is_stable_when_a_file_is_added(tmp_path, image_writer):
    for i in range(30):
        image_writer(tmp_path / "flat" / "a" / f"{i:02d}.png", size=(2, 2), seed=i)
        image_writer(tmp_path / "flat" / "b" / f"{i:02d}.png", size=(2, 2), seed=i)
    before = set(resolve_folder(tmp_path / "flat").eval_split.files)
    image_writer(tmp_path / "flat" / "a" / "new.png", size=(2, 2))
    after = set(resolve_folder(tmp_path / "flat").eval_split.files)
    assert len(before ^ after) <= 2  # at most the boundary file changes side


def test_train_only_folder_is_split_by_fraction(folder_dataset):
    shutil.rmtree(folder_dataset / "val")
    info = resolve_folder(folder_dataset, val_fraction=0.25)
    assert info.train.root == folder_dataset.resolve() / "train"
    assert info.train.class_counts() == {"cat": 3, "dog": 3}
    assert info.eval_split.class_counts() == {"cat": 1, "dog": 1}


def test_hidden_and_nested_entries(folder_dataset):
    (folder_dataset / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    (folder_dataset / "train" / ".hidden_class").mkdir()
    (folder_dataset / "train" / "cat" / ".thumbs").mkdir()
    (folder_dataset / "train" / "cat" / ".thumbs" / "t.png").write_bytes(b"x")
    (folder_dataset / "train" / "cat" / "deeper").mkdir()
    shutil.copy(folder_dataset / "train" / "cat" / "0.png", folder_dataset / "train" / "cat" / "deeper" / "n.png")
    (folder_dataset / "train" / "dog" / "notes.txt").write_text("kept so validate can report it")
    info = resolve_folder(folder_dataset)
    assert info.classes == ("cat", "dog")
    rel = [info.train.relpath(i) for i in range(len(info.train))]
    assert "cat/deeper/n.png" in rel and "dog/notes.txt" in rel
    assert not any("/." in "/" + r for r in rel)


def test_eval_class_unknown_to_train_is_an_error(folder_dataset, image_writer):
    image_writer(folder_dataset / "val" / "horse" / "0.png")
    with pytest.raises(DatasetError, match=r"horse.*expected only classes \['cat', 'dog'\]"):
        resolve_folder(folder_dataset)


def test_eval_split_may_miss_a_class(folder_dataset):
    shutil.rmtree(folder_dataset / "val" / "dog")
    info = resolve_folder(folder_dataset)
    assert info.classes == ("cat", "dog") and info.eval_split.class_counts() == {"cat": 2, "dog": 0}


def test_split_without(folder_dataset):
    split = resolve_folder(folder_dataset).train
    smaller = split.without([split.files[0], split.files[5]])
    assert len(smaller) == 6 and split.files[0] not in smaller.files
    assert smaller.labels == split.labels[1:5] + split.labels[6:] and smaller.classes == split.classes


@pytest.mark.parametrize(
    "setup,message",
    [
        ("missing", "Unknown dataset"),
        ("empty", "is empty"),
        ("files_only", "has no class subfolders"),
        ("a_file", "is a file, not a folder"),
        ("empty_classes", "has no files in its train split"),
        ("val_only", "has val/ but no train/"),
    ],
)
def test_bad_inputs_are_one_line_dataset_errors(tmp_path, image_writer, setup, message):
    root = tmp_path / "ds"
    if setup == "empty":
        root.mkdir()
    elif setup == "files_only":
        image_writer(root / "a.png")
    elif setup == "a_file":
        root.write_text("x")
    elif setup == "empty_classes":
        (root / "train" / "a").mkdir(parents=True)
        (root / "val" / "a").mkdir(parents=True)
    elif setup == "val_only":
        image_writer(root / "val" / "a" / "0.png")
    with pytest.raises(DatasetError, match=message) as info:
        resolve_dataset(str(root))
    assert "\n" not in str(info.value) and "expected" in str(info.value)


def test_unknown_spec_names_the_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="Unknown dataset 'imagenet'.*'sample', 'cifar10'"):
        resolve_dataset("imagenet", data_dir=tmp_path)
