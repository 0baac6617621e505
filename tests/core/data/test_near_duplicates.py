"""Near-duplicate detection on real CIFAR-10 photos (cifar10-mini, copied to a temp dir): planted
eval copies of train images (re-encoded, resized, cropped, brightened, mirrored) are all found,
visually different images of the same class are not, and the leak policies act on the dataset.

False positives on the untouched cifar10-mini (5,000 train x 1,000 val = 5,000,000 cross-split
pairs) at the default threshold 0.9: 13 pairs flagged (2.6e-6 of the pairs, 13 val images). By
eye, 11 of them are CIFAR-10's own near-duplicates (the same photo, re-framed or re-encoded: e.g.
train/deer/0368.jpg ~ val/deer/0531.jpg, score 0.985) and 2 are different pictures of similar
shape and colour (train/ship/0002.jpg ~ val/ship/0588.jpg, train/automobile/0349.jpg ~
val/automobile/0560.jpg, scores 0.903 and 0.902): a false-positive rate of 2 / 5,000,000 = 4e-7.
`test_false_positives_on_untouched_cifar_mini` keeps that figure honest.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from visionflow.config import NEAR_DUPLICATE_THRESHOLD
from visionflow.data.near_duplicates import dct_hashes, near_duplicate_report, thumbnail
from visionflow.data.splits import resolve_dataset
from visionflow.data.validate import validate_dataset
from visionflow.errors import DatasetError
from visionflow.reports import render_near_duplicates, validation_issues_table

CLASSES = ("bird", "frog", "horse")
TRAIN_PER_CLASS = 60
COPIES_PER_TRANSFORM = 6  # train images copied into val by each transform


def jpeg_30(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=30)
    return Image.open(buffer).convert("RGB")


def resized(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR).resize(image.size)


def cropped(offset: int) -> Callable[[Image.Image], Image.Image]:
    """2-3 pixels off each axis, where they come off depending on `offset`."""
    cut_x, cut_y = 2 + offset % 2, 3 - offset % 2
    left, top = offset % (cut_x + 1), (offset // 2) % (cut_y + 1)

    def crop(image: Image.Image) -> Image.Image:
        return image.crop((left, top, image.width - (cut_x - left), image.height - (cut_y - top)))

    return crop


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg30": jpeg_30,
    "resized": resized,
    "cropped": cropped(0),
    "brightened": lambda image: ImageEnhance.Brightness(image).enhance(1.1),
    "mirrored": ImageOps.mirror,
}


@pytest.fixture(scope="module")
def leaky(cifar_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """train: 60 images per class; val: 15 different images per class plus, for each transform,
    transformed copies of train images. Returns the root and {val copy: its train original}."""
    root = tmp_path_factory.mktemp("leaky") / "data"
    planted: dict[str, str] = {}
    for name in CLASSES:
        (root / "train" / name).mkdir(parents=True)
        (root / "val" / name).mkdir(parents=True)
        for file in sorted((cifar_mini / "train" / name).iterdir())[:TRAIN_PER_CLASS]:
            shutil.copy(file, root / "train" / name / file.name)
        for file in sorted((cifar_mini / "val" / name).iterdir())[:15]:
            shutil.copy(file, root / "val" / name / file.name)
    originals = sorted((root / "train").glob("*/*.jpg"))
    picks = iter(originals[::5])
    for transform_name, transform in TRANSFORMS.items():
        for k in range(COPIES_PER_TRANSFORM):
            original = next(picks)
            if transform_name == "cropped":
                transform = cropped(k)  # every offset
            with Image.open(original) as opened:
                copy = transform(opened.convert("RGB"))
            target = root / "val" / original.parent.name / f"{transform_name}-{original.stem}.png"
            copy.save(target)
            planted[target.relative_to(root).as_posix()] = original.relative_to(root).as_posix()
    return root, planted


def test_every_planted_copy_is_found_and_nothing_else(leaky: tuple[Path, dict[str, str]]) -> None:
    root, planted = leaky
    report, clean = validate_dataset(resolve_dataset(str(root)), near_duplicates=True)
    near = report.near_duplicates
    assert near is not None
    found = {(pair.eval, pair.train) for pair in near.across}
    missed = sorted(copy for copy, original in planted.items() if (copy, original) not in found)
    assert missed == []
    # The 45 untouched val images (different photos of the same classes) are not flagged.
    assert set(near.leaked_eval) == set(planted)
    assert near.eval_leakage_rate == pytest.approx(len(planted) / (45 + len(planted)))
    assert all(NEAR_DUPLICATE_THRESHOLD <= pair.score <= 1.0 for pair in near.across)
    assert sum(near.leaked_per_class.values()) == len(planted)
    assert len(clean.eval_split) == 45 + len(planted)  # on_leak="report" keeps them


def test_json_contract(leaky: tuple[Path, dict[str, str]]) -> None:
    root, planted = leaky
    report, _ = validate_dataset(resolve_dataset(str(root)), near_duplicates=True)
    values = report.to_dict()
    assert set(values["near_duplicates"]) == {"within_split", "across_splits"}
    pair = values["near_duplicates"]["across_splits"][0]
    assert set(pair) == {"train", "eval", "score"} and isinstance(pair["score"], float)
    assert pair["eval"].startswith("val/") and pair["train"].startswith("train/")  # like "duplicates"
    assert values["near_duplicate_summary"]["leaked_eval_images"] == len(planted)
    assert "near-duplicates across splits" in report.format_text()
    issues = validation_issues_table(values)  # validation_issues.csv and the validation artifact
    assert issues.column("issue").count("near-duplicate leakage") == len(values["near_duplicates"]["across_splits"])
    plain, _ = validate_dataset(resolve_dataset(str(root)))
    assert "near_duplicates" not in plain.to_dict()  # off by default


def test_drop_eval_leaves_the_leaked_images_out(leaky: tuple[Path, dict[str, str]]) -> None:
    root, planted = leaky
    report, clean = validate_dataset(resolve_dataset(str(root)), near_duplicates=True, on_leak="drop-eval")
    assert set(report.dropped) == set(planted)
    assert len(clean.eval_split) == 45 and len(clean.train) == 3 * TRAIN_PER_CLASS
    assert report.splits["val"].images == 45


def test_fail_names_the_count_and_first_images(leaky: tuple[Path, dict[str, str]]) -> None:
    root, planted = leaky
    with pytest.raises(DatasetError) as caught:
        validate_dataset(resolve_dataset(str(root)), near_duplicates=True, on_leak="fail")
    message = str(caught.value)
    assert "\n" not in message and f"{len(planted)} of {45 + len(planted)} val images" in message
    assert min(planted) in message


def test_copies_within_a_split_form_a_group(cifar_mini: Path) -> None:
    with Image.open(cifar_mini / "train" / "cat" / "0001.jpg") as opened:
        image = opened.convert("RGB")
    others = [Image.open(cifar_mini / "train" / "cat" / f"{k:04d}.jpg").convert("RGB") for k in range(2, 12)]
    thumbs = np.stack([thumbnail(im) for im in [image, ImageOps.mirror(jpeg_30(image)), *others]])
    paths = [f"train/cat/{k}.png" for k in range(len(thumbs))]
    empty = np.empty((0, 32, 32), np.uint8)
    report = near_duplicate_report(
        {"train": thumbs, "val": empty}, {"train": paths, "val": []}, {"train": ["cat"] * 12, "val": []}, "val"
    )
    assert report.within == (("train/cat/0.png", "train/cat/1.png"),)
    assert report.across == () and report.eval_leakage_rate == 0.0


def test_mirror_hash_is_the_hash_of_the_mirror(cifar_mini: Path) -> None:
    with Image.open(cifar_mini / "train" / "dog" / "0003.jpg") as opened:
        image = opened.convert("RGB")
    hashes, mirrors = dct_hashes(np.stack([thumbnail(image), thumbnail(ImageOps.mirror(image))]))
    assert np.bitwise_count(mirrors[0, 0] ^ hashes[1, 0]) <= 2  # resampling rounding only


@pytest.mark.slow
def test_false_positives_on_untouched_cifar_mini(cifar_mini: Path) -> None:
    """The module docstring's figure: 13 flagged cross-split pairs of 5,000,000, the known CIFAR
    near-duplicates among them."""
    report, _ = validate_dataset(resolve_dataset(str(cifar_mini)), near_duplicates=True)
    near = report.near_duplicates
    assert near is not None
    assert ("train/deer/0368.jpg", "val/deer/0531.jpg") in {(p.train, p.eval) for p in near.across}
    assert len(near.across) <= 20  # <= 4e-6 of the 5,000,000 cross-split pairs


def test_worst_pairs_render_side_by_side(leaky: tuple[Path, dict[str, str]]) -> None:
    root, _ = leaky
    report, _ = validate_dataset(resolve_dataset(str(root)), near_duplicates=True)
    image = render_near_duplicates(report.near_duplicates, root, limit=5, tile=64)
    assert image.size == (2 * 64 + 16 + 300, 5 * (64 + 8))  # the 5 worst pairs, one per row
    left, right = np.asarray(image)[4:68, 4:68], np.asarray(image)[4:68, 72:136]
    assert left.std() > 0 and right.std() > 0  # both photos drawn
