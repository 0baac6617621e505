"""Evaluation: metrics against hand-computed values, evaluate_model's preprocessing, predict_images."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from torch import nn

from visionflow.data.decoded import DecodedSplit
from visionflow.errors import DatasetError
from visionflow.evaluation import evaluate_model, predict_images, report_from_logits
from visionflow.train.records import ModelSpec

CLASSES = ["a", "b", "c", "d"]  # "d" never occurs and is never predicted


def crafted():
    """6 images with known softmax probabilities (logits = log p); true labels a a b b c c."""
    probabilities = torch.tensor(
        [
            [0.70, 0.10, 0.10, 0.10],  # a -> a
            [0.20, 0.60, 0.10, 0.10],  # a -> b  wrong, p 0.60
            [0.10, 0.80, 0.05, 0.05],  # b -> b
            [0.30, 0.40, 0.20, 0.10],  # b -> b
            [0.90, 0.05, 0.03, 0.02],  # c -> a  wrong, p 0.90
            [0.25, 0.25, 0.40, 0.10],  # c -> c
        ]
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    files = tuple(f"{CLASSES[y]}/{i}.png" for i, y in enumerate(labels.tolist()))
    return probabilities.log(), labels, files


def test_report_matches_hand_computed_metrics():
    logits, labels, files = crafted()
    report = report_from_logits(logits, labels, CLASSES, files)
    assert report.confusion_matrix == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert report.accuracy == pytest.approx(4 / 6)
    expected_loss = -sum(math.log(p) for p in (0.70, 0.20, 0.80, 0.40, 0.03, 0.40)) / 6
    assert report.loss == pytest.approx(expected_loss, rel=1e-5)
    assert report.top5 is None  # 4 classes
    table = {row[0]: list(row[1:]) for row in report.per_class.rows}  # class -> precision, recall, f1, support
    assert report.per_class.columns == ("class", "precision", "recall", "f1", "support")
    assert table["a"] == pytest.approx([1 / 2, 1 / 2, 1 / 2, 2])
    assert table["b"] == pytest.approx([2 / 3, 1.0, 0.8, 2])
    assert table["c"] == pytest.approx([1.0, 1 / 2, 2 / 3, 2])
    assert table["d"] == [0.0, 0.0, 0.0, 0]  # zero division -> 0.0
    assert [(w["file"], w["true"], w["predicted"]) for w in report.confidently_wrong] == [
        ("c/4.png", "c", "a"),
        ("a/1.png", "a", "b"),
    ]
    assert report.confidently_wrong[0]["probability"] == pytest.approx(0.90)


def test_to_dict_is_json_ready_with_contract_keys():
    report = report_from_logits(*crafted()[:2], CLASSES, crafted()[2], k=1)
    values = json.loads(json.dumps(report.to_dict()))
    assert {
        "accuracy",
        "loss",
        "top5",
        "per_class",
        "confusion_matrix",
        "classes",
        "confidently_wrong",
        "num_images",
    } <= set(values)
    assert values["per_class"][1] == {
        "class": "b",
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert values["num_images"] == 6 and len(values["confidently_wrong"]) == 1
    assert "true \\ predicted" in report.to_text() and "top5: n/a" in report.to_text()


def test_top5_counts_labels_among_the_five_highest_logits():
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1]] * 3)  # ranks: class 0 first ... class 5 last
    report = report_from_logits(logits, torch.tensor([4, 5, 0]), list("uvwxyz"), ("1", "2", "3"))
    assert report.top5 == pytest.approx(2 / 3)
    assert report.accuracy == pytest.approx(1 / 3)


# --- evaluate_model / predict_images with a tiny fixed model ------------------------------------

RGB = ["red", "green", "blue"]
SPEC = ModelSpec(
    name="tudui", num_classes=3, input_size=4, class_names=RGB, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]
)


class ChannelMeans(nn.Module):
    """Logits = each channel's mean: a solid red image is confidently 'red'."""

    def forward(self, x):  # (B, 3, H, W) -> (B, 3)
        return x.mean(dim=(2, 3))


def solid(colours: list[tuple[int, int, int]], size: int = 4) -> torch.Tensor:
    return torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, 3, size, size).contiguous()


def test_evaluate_model_normalizes_with_the_spec_and_reports():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 0)]
    decoded = DecodedSplit(
        solid(colours),
        torch.tensor([0, 1, 2, 1]),
        tuple(RGB),
        "f" * 64,
        ("red/0.png", "green/1.png", "blue/2.png", "green/3.png"),
    )
    report = evaluate_model(ChannelMeans(), SPEC, decoded, device="cpu", batch_size=3)
    expected = (torch.tensor(colours, dtype=torch.float32) / 255 - 0.5) / 0.25  # (4, 3) normalized means
    reference = report_from_logits(expected, decoded.labels, RGB, decoded.files).to_dict()
    got = report.to_dict()
    assert got.pop("loss") == pytest.approx(reference.pop("loss"), rel=1e-5)
    wrong, reference_wrong = got.pop("confidently_wrong"), reference.pop("confidently_wrong")
    assert got == reference and got["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert [w["file"] for w in wrong] == [w["file"] for w in reference_wrong] == ["green/3.png"]
    assert wrong[0]["probability"] == pytest.approx(reference_wrong[0]["probability"], rel=1e-5)


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(classes=("red", "green", "cyan")), r"classes \['red', 'green', 'cyan'\] do not match"),
        (dict(images=solid([(1, 2, 3)], size=8)), "decoded at 8x8 but the model crops its input from 4x4"),
        (dict(images=solid([(1, 2, 3)])[:0], labels=torch.tensor([], dtype=torch.int64)), "no images"),
    ],
)
def test_evaluate_model_rejects_a_split_that_does_not_fit(change, error):
    values = dict(
        images=solid([(1, 2, 3)]), labels=torch.tensor([0]), classes=tuple(RGB), fingerprint="f", files=("x",)
    )
    with pytest.raises(DatasetError, match=error):
        evaluate_model(ChannelMeans(), SPEC, DecodedSplit(**(values | change)), device="cpu")


def test_predict_images_uses_the_spec_preprocessing(tmp_path):
    paths = []
    for name, colour in [("r.png", (250, 10, 10)), ("b.jpg", (10, 10, 250))]:
        Image.new("RGB", (20, 12), colour).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    Image.new("LA", (6, 6), (0, 255)).save(tmp_path / "grey.png")  # other modes are converted to RGB
    paths.append(tmp_path / "grey.png")
    predictions = predict_images(ChannelMeans(), SPEC, paths, device="cpu", batch_size=2)
    assert [p["label"] for p in predictions[:2]] == ["red", "blue"]
    assert [p["image"] for p in predictions] == [str(p) for p in paths]
    for p in predictions:
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["probability"] == max(p["probabilities"].values())
    assert predictions[2]["probabilities"] == pytest.approx({c: 1 / 3 for c in RGB}, abs=1e-3)
    assert predict_images(ChannelMeans(), SPEC, [], device="cpu") == []


def test_predict_images_names_an_unreadable_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        predict_images(ChannelMeans(), SPEC, [bad], device="cpu")


def test_predict_images_agrees_with_evaluating_the_cached_split(tmp_path):
    """Both preprocessing paths (PIL pipeline per file, decoded uint8 cache + batch normalization)
    must feed the model the same input, for images larger than the input size and not square."""
    from visionflow.data.decoded import load_decoded
    from visionflow.data.splits import resolve_dataset

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("x", "y"):
            (tmp_path / split / label).mkdir(parents=True)
            pixels = torch.randint(0, 256, (40, 56, 3), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(pixels).save(tmp_path / split / label / "0.png")
    split = resolve_dataset(str(tmp_path)).eval_split
    spec = ModelSpec(name="tudui", num_classes=2, input_size=16, class_names=["x", "y"], mean=[0.4] * 3, std=[0.3] * 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))
    report = evaluate_model(model, spec, load_decoded(split, 16, tmp_path / "cache"), device="cpu")
    predictions = predict_images(model, spec, split.files, device="cpu")
    expected_loss = -sum(math.log(p["probabilities"][name]) for p, name in zip(predictions, ["x", "y"])) / 2
    assert report.loss == pytest.approx(expected_loss, rel=1e-4)
