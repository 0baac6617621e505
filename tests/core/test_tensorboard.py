"""TensorBoard logging, read back with TensorBoard's own event reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from visionflow.config import build_config
from visionflow.data.decoded import DecodedSplit
from visionflow.hparams import flatten_hparams, log_hparams
from visionflow.models import build_model
from visionflow.tensorboard import (
    TensorBoardCallback,
    log_confusion_matrix,
    log_image,
    log_model_graph,
    log_pr_curves,
)
from visionflow.train.engine import fit
from visionflow.train.records import EpochMetrics, FitStart, ModelSpec

CLASSES = ("cat", "dog")


def read(log_dir: Path) -> EventAccumulator:
    # size_guidance 0 = keep everything (the default samples scalars and keeps few tensors).
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def session_hparams(accumulator: EventAccumulator) -> dict:
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    return dict(plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams)


def tiny_split(n: int, seed: int) -> DecodedSplit:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)  # (N, 3, 32, 32)
    labels = torch.arange(n) % 2
    return DecodedSplit(
        images, labels, CLASSES, f"fp{seed}", tuple(f"{CLASSES[y]}/{i}.png" for i, y in enumerate(labels.tolist()))
    )


def start(step: int = 0, epoch: int = 0) -> FitStart:
    return FitStart(
        epoch=epoch,
        step=step,
        epochs=2,
        steps_per_epoch=2,
        train_images=16,
        eval_images=8,
        device="cpu",
        config={"optim": {"lr": 0.1}},
        spec={},
    )


def epoch_metrics(epoch: int, eval_accuracy: float) -> EpochMetrics:
    return EpochMetrics(
        epoch=epoch,
        step=2 * epoch,
        train_loss=1.0,
        train_accuracy=0.5,
        eval_loss=0.9,
        eval_accuracy=eval_accuracy,
        lr=0.1,
        images_per_second=100.0,
        seconds=1.0,
    )


def test_callback_logs_a_real_fit(tmp_path: Path) -> None:
    config = build_config(
        {"data": {"batch_size": 4, "mean": [0.5] * 3, "std": [0.25] * 3}, "training": {"epochs": 2, "device": "cpu"}}
    )
    spec = ModelSpec("tudui", 2, 32, list(CLASSES))
    callback = TensorBoardCallback(tmp_path / "tb", every_n_steps=2)
    result = fit(build_model("tudui", 2), tiny_split(16, 0), tiny_split(8, 1), config, spec, callbacks=[callback])

    events = read(tmp_path / "tb")
    steps_per_epoch = 16 // 4
    assert [e.step for e in events.Scalars("loss/train_step")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("lr")] == [2, 4, 6, 8]
    for tag in ("loss/train", "loss/eval", "accuracy/train", "accuracy/eval", "throughput/images_per_second"):
        assert [e.step for e in events.Scalars(tag)] == [steps_per_epoch, 2 * steps_per_epoch], tag
    assert [e.value for e in events.Scalars("epoch")] == [1.0, 2.0]
    final = result.history[-1]
    assert events.Scalars("accuracy/eval")[-1].value == pytest.approx(final.eval_accuracy)


def test_resumed_callback_hides_the_crashed_tail(tmp_path: Path) -> None:
    crashed = TensorBoardCallback(tmp_path)
    crashed.on_fit_start(start())
    crashed.on_epoch_end(epoch_metrics(1, 0.25))
    crashed.on_epoch_end(epoch_metrics(2, 0.50))  # after the last checkpoint: lost with the crash
    crashed.writer.close()

    resumed = TensorBoardCallback(tmp_path)
    resumed.on_fit_start(start(step=2, epoch=1))
    resumed.on_epoch_end(epoch_metrics(2, 0.75))
    resumed.writer.close()

    assert [(e.step, e.value) for e in read(tmp_path).Scalars("accuracy/eval")] == [(2, 0.25), (4, 0.75)]


def test_callback_rejects_a_zero_interval(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every_n_steps 0"):
        TensorBoardCallback(tmp_path, every_n_steps=0)


@pytest.mark.parametrize("name", ["tudui", "resnet18_cifar"])
def test_model_graph(tmp_path: Path, name: str) -> None:
    model = build_model(name, 10).train()
    log_model_graph(tmp_path, model, 32)
    events = read(tmp_path)
    assert events.Tags()["graph"]
    assert len(events.Graph().node) > 10
    assert model.training  # tracing ran in eval mode and restored the mode


def test_hparams_go_into_the_run_folder(tmp_path: Path) -> None:
    log_hparams(
        tmp_path,
        {
            "model": {"name": "tudui"},
            "optim": {"lr": 0.05, "nesterov": True},
            "data": {"mean": [0.5, 0.5, 0.5], "augment": None},
        },
        {"eval_accuracy": 0.8},
        step=7,
    )
    events = read(tmp_path)
    hparams = session_hparams(events)
    assert hparams["model.name"].string_value == "tudui"
    assert hparams["optim.lr"].number_value == pytest.approx(0.05)
    assert hparams["data.mean"].string_value == "[0.5, 0.5, 0.5]"
    assert "data.augment" not in hparams
    assert [(e.step, e.value) for e in events.Scalars("hparam/eval_accuracy")] == [(7, pytest.approx(0.8))]
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_flatten_hparams_rejects_objects() -> None:
    assert flatten_hparams({"a": {"b": 1, "c": (1, 2)}}) == {"a.b": 1, "a.c": "[1, 2]"}
    with pytest.raises(ValueError, match="'a.b'"):
        flatten_hparams({"a": {"b": object()}})


def test_images_confusion_matrix_and_pr_curves(tmp_path: Path) -> None:
    log_image(tmp_path, "preview/pil", Image.new("RGB", (6, 4), (255, 0, 0)))
    log_image(tmp_path, "preview/tensor", torch.zeros(3, 5, 7, dtype=torch.uint8), step=3)
    figure = log_confusion_matrix(tmp_path, np.array([[3, 1], [0, 4]]), CLASSES, step=2)
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])  # (N, C)
    log_pr_curves(tmp_path, probabilities, [0, 1, 1], CLASSES, step=2)

    events = read(tmp_path)
    assert set(events.Tags()["images"]) == {"preview/pil", "preview/tensor", "eval/confusion_matrix"}
    stored = events.Images("preview/pil")[0]
    assert (stored.width, stored.height) == (6, 4)
    assert events.Images("preview/tensor")[0].step == 3
    matrix = events.Images("eval/confusion_matrix")[0]
    assert (matrix.width, matrix.height) == figure.size
    assert set(events.Tags()["tensors"]) == {"pr/cat", "pr/dog"}


def test_bad_inputs_name_the_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\(2, 5, 7\)"):
        log_image(tmp_path, "x", torch.zeros(2, 5, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        log_pr_curves(tmp_path, torch.rand(3, 3), [0, 1, 1], CLASSES)
