"""The training engine on tiny data: devices, registries, loaders, determinism, resume, callbacks,
checkpoints, early stopping, regularization. Each fit is a few steps of tudui on 32x32 images."""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import ENGINE_CLASSES as NUM_CLASSES
from tests.helpers import ENGINE_EVAL as EVAL
from tests.helpers import ENGINE_TRAIN as TRAIN
from tests.helpers import KillAfter
from tests.helpers import engine_config as _config
from tests.helpers import engine_fit as _fit
from visionflow import checkpoints
from visionflow.config import is_improvement
from visionflow.data.loaders import DeviceLoader, eval_batches, make_loader
from visionflow.data.transforms import BatchTransform, mean_std
from visionflow.errors import ConfigError, DatasetError, DeviceError
from visionflow.models import build_model
from visionflow.train import engine, records
from visionflow.train.device import resolve_device
from visionflow.train.optim import build_optimizer, build_scheduler
from visionflow.train.records import ModelSpec
from visionflow.train.rng import Generators, seed_everything

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Recorder(records.Callback):
    def __init__(self):
        self.starts, self.steps, self.epochs, self.ends = [], [], [], []

    def on_fit_start(self, state):
        self.starts.append(state)

    def on_step_end(self, step, loss, lr):
        self.steps.append((step, loss, lr))

    def on_epoch_end(self, metrics):
        self.epochs.append(metrics)

    def on_fit_end(self, result):
        self.ends.append(result)


# ---------------------------------------------------------------------------------------------
# Device and seeding


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("visionflow.train.device._mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr("visionflow.train.device._mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_explicit_devices(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="Device 'cuda:2' does not exist: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_missing_accelerators_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("visionflow.train.device._mps_available", lambda: False)
    with pytest.raises(DeviceError, match="Device 'cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="Device 'mps' requested but MPS"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match=r"Invalid device 'tpu'\. Choose from: auto, cpu, mps, cuda, cuda:N"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="Invalid device 'cpu:1'"):
        resolve_device("cpu:1")


def test_seed_everything_drives_every_generator():
    def draws():
        g = seed_everything(7)
        return random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item()

    assert draws() == draws()


# ---------------------------------------------------------------------------------------------
# Registries


def _optim(**fields):
    return _config(optim=fields).resolved().optim


def test_optimizer_registry():
    model = build_model("tudui", NUM_CLASSES)
    sgd = build_optimizer(model, _optim(optimizer="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    decayed, plain = sgd.param_groups
    assert decayed["weight_decay"] == 1e-3 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])  # biases
    assert isinstance(build_optimizer(model, _optim(optimizer="adam")), torch.optim.Adam)
    assert isinstance(build_optimizer(model, _optim(optimizer="adamw")), torch.optim.AdamW)
    with pytest.raises(ConfigError, match=r"Invalid optimizer 'lion'\. Choose from: adam, adamw, sgd"):
        build_optimizer(model, _optim().model_copy(update={"optimizer": "lion"}))
    with pytest.raises(ConfigError, match="Nesterov needs optim.momentum > 0"):
        build_optimizer(model, _optim(optimizer="sgd", momentum=0.0, nesterov=True))


def _lrs(scheduler_name: str, epochs: int = 4, per_epoch: int = 10, **fields) -> list[float]:
    optim = _optim(optimizer="sgd", lr=0.1, scheduler=scheduler_name, **fields)
    optimizer = build_optimizer(build_model("tudui", NUM_CLASSES), optim)
    scheduler = build_scheduler(optimizer, optim, epochs, per_epoch)
    lrs = []
    for _ in range(epochs * per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_scheduler_registry_shapes():
    assert _lrs("none") == [pytest.approx(0.1)] * 40
    step = _lrs("step", step_size=1, gamma=0.5)  # step_size in epochs, stepped per batch
    assert step[9] == pytest.approx(0.1) and step[10] == pytest.approx(0.05) and step[39] == pytest.approx(0.0125)
    cosine = _lrs("cosine")
    assert cosine[0] == pytest.approx(0.1) and cosine[-1] < 0.001 and cosine == sorted(cosine, reverse=True)
    onecycle = _lrs("onecycle")
    assert max(onecycle) == pytest.approx(0.1) and onecycle.index(max(onecycle)) == 9  # warm-up: 25 % of 40 steps
    assert onecycle[0] < 0.01 and onecycle[-1] < 1e-4
    for total in range(1, 9):  # tiny runs: OneCycleLR's own phase arithmetic divides by zero at 4 steps
        tiny = _lrs("onecycle", epochs=1, per_epoch=total)
        assert len(tiny) == total and all(0 < lr <= 0.1 + 1e-12 for lr in tiny)
    optim = _optim().model_copy(update={"scheduler": "plateau"})
    with pytest.raises(ConfigError, match=r"Invalid scheduler 'plateau'\. Choose from: cosine, none, onecycle, step"):
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), optim, 1, 1)


# ---------------------------------------------------------------------------------------------
# Loaders


def _epoch_batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_device_loader_covers_the_split_once_per_epoch():
    gens = Generators.seeded(0, torch.device("cpu"))
    loader = make_loader(TRAIN, 40, torch.device("cpu"), shuffle=True, generators=gens)
    assert isinstance(loader, DeviceLoader) and len(loader) == 3
    first, second = _epoch_batches(loader), _epoch_batches(loader)
    assert [len(y) for _, y in first] == [40, 40, 16]
    for epoch in (first, second):
        assert sorted(torch.cat([y for _, y in epoch]).tolist()) == sorted(TRAIN.labels.tolist())
    assert not torch.equal(first[0][0], second[0][0])  # reshuffled every epoch
    dropped = make_loader(TRAIN, 40, torch.device("cpu"), drop_last=True)
    assert len(dropped) == 2 and [len(y) for _, y in dropped] == [40, 40]
    assert torch.equal(next(iter(dropped))[0], TRAIN.images[:40])  # no shuffle: in order


def test_make_loader_refuses_an_unseeded_shuffle():
    with pytest.raises(ValueError, match="generators"):
        make_loader(TRAIN, 32, torch.device("cpu"), shuffle=True)


def test_collect_logits_and_evaluate():
    model = build_model("tudui", NUM_CLASSES)
    mean, std = mean_std(EVAL.images)
    batches = eval_batches(EVAL, mean, std, torch.device("cpu"), batch_size=10)
    logits, labels = engine.collect_logits(model, batches, torch.device("cpu"), "fp32")
    assert logits.shape == (32, NUM_CLASSES) and logits.dtype == torch.float32 and torch.equal(labels, EVAL.labels)
    with torch.no_grad():
        expected = model(BatchTransform(mean, std, "cpu")(EVAL.images))
    torch.testing.assert_close(logits, expected)
    loss, accuracy = engine.loss_and_accuracy(logits, labels)
    assert loss == pytest.approx(nn.functional.cross_entropy(expected, EVAL.labels).item(), rel=1e-5)
    assert accuracy == pytest.approx((expected.argmax(1) == EVAL.labels).float().mean().item())


def test_test_flip_averages_each_images_logits_with_its_mirror_images():
    model = build_model("tudui", NUM_CLASSES)
    mean, std = mean_std(EVAL.images)
    batches = eval_batches(EVAL, mean, std, torch.device("cpu"), batch_size=10)
    logits, _ = engine.collect_logits(model, batches, torch.device("cpu"), "fp32", flip=True)
    inputs = BatchTransform(mean, std, "cpu")(EVAL.images)  # (N, C, H, W)
    with torch.no_grad():
        plain, mirrored = model(inputs), model(inputs.flip(-1))
    torch.testing.assert_close(logits, (plain + mirrored) / 2)
    assert not torch.allclose(plain, mirrored)  # the mirror image really is another input


def test_fit_evaluates_with_the_recipes_test_flip_and_records_it_in_the_spec():
    config = _config(epochs=1)
    flipped = _fit(config)
    plain = _fit(_config(epochs=1, data={"test_flip": False}))
    assert flipped.spec.test_flip and not plain.spec.test_flip
    assert flipped.weights_sha256 == plain.weights_sha256  # the same training: only evaluation differs
    assert flipped.history[0].eval_loss != plain.history[0].eval_loss


def test_the_default_recipe_whitens_the_first_layer_and_the_tutorial_recipe_does_not(tmp_path):
    assert _config().resolved().model.whiten and not _config(optim={"recipe": "tutorial"}).resolved().model.whiten
    whitened = _fit(_config(epochs=1), checkpoint_dir=tmp_path)
    plain = _fit(_config(epochs=1, model={"whiten": False}))
    assert whitened.weights_sha256 != plain.weights_sha256
    assert checkpoints.load_checkpoint(tmp_path / "last.pt")["config"]["model"]["whiten"] is True  # recorded


# ---------------------------------------------------------------------------------------------
# fit: reproducibility, resume, checkpoints


def test_same_seed_same_weights():
    a, b = _fit(_config()), _fit(_config())
    assert a.weights_sha256 == b.weights_sha256
    assert [asdict_loss(m) for m in a.history] == [asdict_loss(m) for m in b.history]
    c = _fit(_config(training={"seed": 1}))
    assert c.weights_sha256 != a.weights_sha256


def asdict_loss(m: records.EpochMetrics) -> tuple:
    return m.train_loss, m.train_accuracy, m.eval_loss, m.eval_accuracy


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    config = _config(epochs=3)
    straight = _fit(config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _fit(config, tmp_path / "crashed", callbacks=[KillAfter(1)])
    assert checkpoints.load_checkpoint(tmp_path / "crashed" / "last.pt")["epoch"] == 1
    recorder = Recorder()
    resumed = _fit(config, resume_from=tmp_path / "crashed" / "last.pt", callbacks=[recorder])
    assert resumed.weights_sha256 == straight.weights_sha256
    assert [m.epoch for m in resumed.history] == [1, 2, 3] and [m.epoch for m in recorder.epochs] == [2, 3]
    assert recorder.starts[0].epoch == 1 and recorder.starts[0].step == 3
    assert resumed.last_checkpoint == tmp_path / "crashed" / "last.pt"  # continues beside its checkpoint
    assert resumed.best_metric == straight.best_metric and resumed.best_epoch == straight.best_epoch


def test_resume_ignores_the_workers_stream_of_older_checkpoints(tmp_path):
    config = _config(epochs=2)
    straight = _fit(config)
    with pytest.raises(KeyboardInterrupt):
        _fit(config, tmp_path, callbacks=[KillAfter(1)])
    stored = checkpoints.load_checkpoint(tmp_path / "last.pt")
    assert "workers" not in stored["rng"]
    # What checkpoints written while fit still had a DataLoader path carry:
    stored["rng"]["workers"] = torch.Generator().manual_seed(2).get_state()
    checkpoints.save_checkpoint(tmp_path / "last.pt", stored)
    assert _fit(config, resume_from=tmp_path / "last.pt").weights_sha256 == straight.weights_sha256


def test_resume_of_a_finished_run_returns_the_stored_result(tmp_path):
    done = _fit(_config(), tmp_path)
    recorder = Recorder()
    again = _fit(_config(), resume_from=tmp_path / "last.pt", callbacks=[recorder])
    assert recorder.starts == [] and recorder.epochs == []
    assert again.weights_sha256 == done.weights_sha256 and again.history == done.history
    assert again.train_seconds == done.train_seconds


def test_resume_refuses_a_different_config(tmp_path):
    _fit(_config(), tmp_path)
    with pytest.raises(ConfigError, match=r"config differs in optim\.lr \(checkpoint 0\.003, now 0\.2\)"):
        _fit(_config(optim={"lr": 0.2}), resume_from=tmp_path / "last.pt")


def test_checkpoints_every_epoch(tmp_path):
    seen = []

    class Inspect(records.Callback):
        def on_epoch_end(self, metrics):
            seen.append(checkpoints.load_checkpoint(tmp_path / "last.pt")["epoch"])

    result = _fit(_config(epochs=3), tmp_path, callbacks=[Inspect()])
    assert seen == [1, 2, 3]
    last = checkpoints.load_checkpoint(tmp_path / "last.pt")  # weights_only=True
    assert checkpoints.TRAINING_KEYS <= set(last)
    assert last["step"] == 9 and len(last["history"]) == 3 and last["scaler"] is None
    assert checkpoints.weights_sha256(last["model"]) == result.weights_sha256
    best = checkpoints.load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == result.best_epoch == last["best_epoch"]
    assert best["metrics"]["eval_accuracy"] == result.best_metric
    assert last["config"]["data"]["mean"] == result.spec.mean == last["spec"]["mean"]
    assert result.best_checkpoint == tmp_path / "best.pt" and result.last_checkpoint == tmp_path / "last.pt"


def test_normalization_from_config_or_train_split():
    computed = _fit(_config(epochs=1))
    mean, std = mean_std(TRAIN.images)
    assert computed.spec.mean == mean and computed.spec.std == std
    given = _fit(_config(epochs=1, data={"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}))
    assert given.spec.mean == [0.5, 0.5, 0.5] and given.spec.std == [0.2, 0.2, 0.2]


def test_fit_result_figures():
    result = _fit(_config(epochs=2))
    assert result.device == "cpu" and not result.stopped_early and len(result.history) == 2
    assert result.train_seconds > 0 and result.train_images_per_second == pytest.approx(2 * 96 / result.train_seconds)
    assert result.last_checkpoint is None and result.best_checkpoint is None
    m = result.history[-1]
    assert m.step == 6 and 0 <= m.train_accuracy <= 1 and 0 <= m.eval_accuracy <= 1 and m.images_per_second > 0


def test_where_the_epochs_time_goes(tmp_path):
    class Slow(records.Callback):
        def on_epoch_end(self, metrics):
            time.sleep(0.3)  # an epoch-end callback's cost, as TensorBoard or a flow's artifacts

    start = time.perf_counter()
    result = _fit(_config(epochs=2), checkpoint_dir=tmp_path, callbacks=[Slow()])
    wall = time.perf_counter() - start
    phases = result.phase_seconds
    assert tuple(phases) == engine.EPOCH_PHASES and result.timed_epochs == 2
    assert all(phases[p] > 0 for p in ("data", "forward", "backward", "optimizer", "evaluation", "checkpoint"))
    assert 0.6 <= phases["callbacks"] < 0.6 + 0.5 * wall
    loop = sum(phases[p] for p in ("data", "forward", "backward", "optimizer"))
    assert loop <= result.train_seconds  # the loops, less their bookkeeping and the epoch's sync
    assert sum(phases.values()) <= wall
    resumed = _fit(_config(epochs=2), resume_from=tmp_path / "last.pt")  # finished: no epoch trained
    assert resumed.timed_epochs == 0 and resumed.phase_seconds == {}


# ---------------------------------------------------------------------------------------------
# fit: training decisions


def test_early_stopping_on_the_monitored_metric():
    # lr 1e-12 leaves the weights unchanged: the metric never improves after epoch 1.
    config = _config(
        epochs=5,
        optim={"recipe": "tutorial", "lr": 1e-12},
        training={"early_stopping_patience": 2, "monitor": "eval_loss"},
    )
    result = _fit(config)
    assert result.stopped_early and [m.epoch for m in result.history] == [1, 2, 3] and result.best_epoch == 1
    assert result.best_metric == result.history[0].eval_loss


def test_time_to_accuracy_is_the_first_epoch_past_each_milestone():
    history = [
        records.EpochMetrics(epoch, epoch, 1.0, 0.5, 1.0, accuracy, 0.1, 100.0, seconds=2.0)
        for epoch, accuracy in enumerate([0.4, 0.55, 0.52, 0.65], 1)
    ]
    assert records.time_to_accuracy(history) == {
        "50%": {"epoch": 2, "seconds": 4.0},
        "60%": {"epoch": 4, "seconds": 8.0},
        "70%": None,
    }


def test_early_stopping_predicate():
    assert not engine._should_stop_early(epoch=3, best_epoch=2, patience=2)
    assert engine._should_stop_early(epoch=4, best_epoch=2, patience=2)
    assert not engine._should_stop_early(epoch=40, best_epoch=1, patience=None)


def test_should_save_best_follows_the_monitor_direction():
    assert is_improvement(0.5, None, "eval_accuracy")
    assert is_improvement(0.6, 0.5, "eval_accuracy") and not is_improvement(0.5, 0.5, "eval_accuracy")
    assert is_improvement(0.4, 0.5, "eval_loss") and not is_improvement(0.6, 0.5, "eval_loss")


def test_label_smoothing_changes_the_training_loss():
    plain = _fit(_config(epochs=1, optim={"label_smoothing": 0.0}))
    smooth = _fit(_config(epochs=1, optim={"label_smoothing": 0.5}))
    assert smooth.history[0].train_loss != plain.history[0].train_loss
    assert smooth.weights_sha256 != plain.weights_sha256


def _one_step_change(grad_clip: float) -> float:
    """L2 norm of the parameter change after one plain-SGD step (lr 1) on one batch."""
    torch.manual_seed(0)
    model = build_model("tudui", NUM_CLASSES)
    before = nn.utils.parameters_to_vector(model.parameters()).clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, _optim(scheduler="none"), 1, 1)
    inputs = BatchTransform([0.5] * 3, [0.25] * 3, "cpu")(TRAIN.images[:32])
    engine.train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        scheduler,
        [(inputs, TRAIN.labels[:32])],
        torch.device("cpu"),
        grad_clip=grad_clip,
    )
    return (nn.utils.parameters_to_vector(model.parameters()) - before).norm().item()


def test_gradient_clipping_bounds_the_step():
    assert _one_step_change(0.0) > 0.01
    assert _one_step_change(1e-3) == pytest.approx(1e-3, rel=1e-3)  # lr 1 x clipped norm 1e-3


def test_divergence_is_a_clear_error(tmp_path):
    config = _config(epochs=2, optim={"recipe": "tutorial", "lr": 10.0})
    with pytest.raises(
        ConfigError, match=r"Training diverged in epoch 1 \(train loss .*, eval loss nan\) with optim.lr 10\.0"
    ):
        _fit(config, tmp_path)
    assert not (tmp_path / "last.pt").exists()


def test_labels_beyond_the_model_classes_are_a_dataset_error():
    spec = ModelSpec("tudui", 3, 32, list("abc"))
    with pytest.raises(DatasetError, match="label 3 but the model has 3 classes"):
        engine.fit(build_model("tudui", 3), TRAIN, EVAL, _config(), spec)


def test_bf16_autocast_on_cpu_trains():
    result = _fit(_config(epochs=1, training={"precision": "bf16", "channels_last": True}))
    assert np.isfinite(result.history[0].train_loss)


# ---------------------------------------------------------------------------------------------
# fit: callbacks, progress


def test_callbacks_receive_metrics():
    recorder = Recorder()
    result = _fit(_config(epochs=2), callbacks=[recorder])
    start = recorder.starts[0]
    assert (start.epoch, start.step, start.epochs, start.steps_per_epoch) == (0, 0, 2, 3)
    assert start.train_images == 96 and start.eval_images == 32 and start.config["data"]["mean"] is not None
    assert [s for s, _, _ in recorder.steps] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(loss, float) and isinstance(lr, float) for _, loss, lr in recorder.steps)
    assert recorder.epochs == result.history and recorder.ends == [result]


def test_step_callbacks_every_n_steps():
    class EveryTwo(Recorder):
        every_n_steps = 2

    recorder = EveryTwo()
    _fit(_config(epochs=2), callbacks=[recorder])
    assert [s for s, _, _ in recorder.steps] == [2, 4, 6]


def test_progress_plain_lines_off_a_tty():
    stream = io.StringIO()
    progress = engine.Progress(2, stream)
    metrics = records.EpochMetrics(1, 3, 1.2, 0.5, 1.1, 0.6, 0.01, 1234.0, 2.0)
    progress.update(1, 1, 3, torch.tensor(3.0), torch.tensor(1), 2, 0.1)
    progress.epoch_end(metrics)
    assert stream.getvalue() == (
        "epoch 1/2 train_loss 1.2000 train_acc 0.500 eval_loss 1.1000 eval_acc 0.600 lr 0.01 1,234 img/s 2.0s\n"
    )


def test_progress_bar_on_a_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    progress = engine.Progress(2, stream)
    progress.update(1, 1, 3, torch.tensor(3.0), torch.tensor(1), 2, 0.1)
    progress.update(1, 2, 3, torch.tensor(3.0), torch.tensor(1), 2, 0.1)  # throttled: not redrawn
    assert stream.getvalue() == "\repoch 1/2 [1/3] loss 1.5000 acc 0.500 20 img/s"


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)


@pytest.mark.gpu
@gpu
def test_cuda_bf16_channels_last_fast_path():
    config = _config(epochs=2, training={"device": "cuda", "precision": "bf16", "channels_last": True})
    result = _fit(config)
    assert result.device.startswith("cuda") and np.isfinite(result.history[-1].train_loss)
    loader = make_loader(TRAIN, 32, torch.device("cuda"))
    images, labels = next(iter(loader))
    assert images.device.type == "cuda" and images.dtype == torch.uint8 and labels.device.type == "cuda"


@pytest.mark.gpu
@gpu
def test_cuda_resume_is_bit_identical(tmp_path, monkeypatch):
    config = _config(epochs=3, training={"device": "cuda"})
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # same kernels in both runs
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    straight = _fit(config, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _fit(config, tmp_path / "b", callbacks=[KillAfter(2)])
    resumed = _fit(config, resume_from=tmp_path / "b" / "last.pt")
    assert resumed.weights_sha256 == straight.weights_sha256


@pytest.mark.gpu
@gpu
def test_cuda_phases_are_gpu_time():
    result = _fit(_config(epochs=2, training={"device": "cuda"}))
    assert result.timed_epochs == 2 and all(result.phase_seconds[p] > 0 for p in ("forward", "backward", "optimizer"))
    assert sum(result.phase_seconds[p] for p in ("data", "forward", "backward", "optimizer")) <= result.train_seconds


@pytest.mark.gpu
@gpu
def test_cuda_compile_trains():
    result = _fit(_config(epochs=1, training={"device": "cuda", "compile": True}))
    assert np.isfinite(result.history[0].train_loss)
