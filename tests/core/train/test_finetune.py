"""Fine-tuning in the engine: head-only epochs leave the backbone (and its BatchNorm statistics)
bit-identical, the backbone's lower learning rate, exact resume mid-freeze and after unfreezing,
and checkpoints of the CIFAR-stem net written when it was called resnet18."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import ENGINE_CLASSES, KillAfter, engine_config, engine_split
from visionflow import checkpoints
from visionflow.config import build_config
from visionflow.manifest import Manifest
from visionflow.models import build_model
from visionflow.train import engine
from visionflow.train.optim import build_optimizer
from visionflow.train.records import ModelSpec
from visionflow.train.rng import seed_everything
from visionflow.weights import load_pretrained, locate

OLD_RUNS = Path(__file__).resolve().parents[2] / "fixtures" / "written_by_0.1" / "runs"
BACKBONE = "mobilenet_v3_small"  # a torchvision backbone with BatchNorm, small enough for tests; head classifier.3
HEAD = "classifier.3."
SPEC = ModelSpec(BACKBONE, ENGINE_CLASSES, 32, list("abcd"))
TRAIN, EVAL = engine_split(32, 0), engine_split(16, 1)  # two batches of 16 per epoch


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A state dict with 1000 classes standing in for the backbone's ImageNet weights (made here)."""
    path = tmp_path_factory.mktemp("weights") / f"{BACKBONE}.pth"
    torch.manual_seed(0)
    torch.save(build_model(BACKBONE, 1000).state_dict(), path)
    return path


def _config(pretrained: Path, epochs: int, freeze: int, **optim):
    # 32 px engine images, no crop; the finetune recipe otherwise (random-resized crops, AdamW, cosine)
    return engine_config(
        epochs,
        model={"name": BACKBONE, "weights": str(pretrained), "freeze_epochs": freeze},
        data={"image_size": 32, "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3, "batch_size": 16},
        optim=optim,
        training={"precision": "fp32", "channels_last": False},  # no autotune probe
    )


def _fit(config, checkpoint_dir=None, resume_from=None, callbacks=()):
    seed_everything(config.training.seed)
    model = build_model(BACKBONE, ENGINE_CLASSES)
    if resume_from is None:
        load_pretrained(model, locate(config.model, "."))
    return model, engine.fit(model, TRAIN, EVAL, config, SPEC, checkpoint_dir, resume_from, list(callbacks))


def _backbone(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(HEAD)}


def test_head_only_epochs_leave_the_backbone_and_its_batchnorm_statistics_bit_identical(pretrained):
    source = {k: v for k, v in torch.load(pretrained, weights_only=True).items() if not k.startswith(HEAD)}
    seed_everything(0)
    head_before = build_model(BACKBONE, ENGINE_CLASSES).state_dict()["classifier.3.weight"]  # what _fit starts from
    model, result = _fit(_config(pretrained, epochs=1, freeze=1))
    assert result.history[0].train_loss > 0
    after = _backbone(model)
    assert after.keys() == source.keys() and all(torch.equal(after[k], source[k]) for k in source)
    assert not torch.equal(model.state_dict()["classifier.3.weight"], head_before)  # the head trained
    unfrozen, _ = _fit(_config(pretrained, epochs=2, freeze=1))
    moved = _backbone(unfrozen)
    assert not torch.equal(moved["features.0.0.weight"], source["features.0.0.weight"])
    assert not torch.equal(moved["features.0.1.running_mean"], source["features.0.1.running_mean"])  # BN trains again
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_the_backbone_trains_at_a_fraction_of_the_heads_rate(pretrained):
    config = _config(pretrained, epochs=1, freeze=0).resolved()
    model = build_model(BACKBONE, ENGINE_CLASSES)
    groups = build_optimizer(model, config.optim).param_groups
    head = {id(p) for p in model.classifier[3].parameters()}
    rates = {("head" if id(p) in head else "backbone", g["lr"]) for g in groups for p in g["params"]}
    lr, scale = config.optim.lr, config.optim.backbone_lr_scale
    assert (config.optim.recipe, scale) == ("finetune", 0.1)
    assert rates == {("head", lr), ("backbone", lr * scale)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize(("freeze", "crash_after"), [(2, 1), (1, 2)], ids=["mid-freeze", "after-unfreezing"])
def test_resume_is_bit_identical_mid_freeze_and_after_unfreezing(pretrained, tmp_path, freeze, crash_after):
    config = _config(pretrained, epochs=3, freeze=freeze)
    _, straight = _fit(config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _fit(config, tmp_path / "crashed", callbacks=[KillAfter(crash_after)])
    _, resumed = _fit(config, resume_from=tmp_path / "crashed" / "last.pt")
    assert resumed.weights_sha256 == straight.weights_sha256
    assert [m.eval_loss for m in resumed.history] == [m.eval_loss for m in straight.history]


def _as_format_1(state: dict, written_by_01: dict) -> dict:
    """`state`, a checkpoint of this version, as version 0.1 wrote it: its config keys only (taken from
    a checkpoint 0.1 wrote), the CIFAR-stem net named resnet18, format_version 1."""
    config = {
        section: {key: value for key, value in state["config"][section].items() if key in fields}
        for section, fields in written_by_01["config"].items()
    }
    config["model"]["name"] = "resnet18"
    return {**state, "config": config, "spec": {**state["spec"], "name": "resnet18"}, "format_version": 1}


def test_a_resnet18_checkpoint_of_0_1_is_the_cifar_stem_net_and_resumes_bit_identically(tmp_path):
    written_by_01 = checkpoints.load_weights_only(OLD_RUNS / "cut" / "checkpoints" / "last.pt")
    config = engine_config(
        2,
        model={"name": "resnet18_cifar"},
        data={"batch_size": 16},
        training={"precision": "fp32", "channels_last": False},
    )
    spec = ModelSpec("resnet18_cifar", ENGINE_CLASSES, 32, list("abcd"))

    def fit(checkpoint_dir=None, resume_from=None, callbacks=()):
        seed_everything(0)
        model = build_model("resnet18_cifar", ENGINE_CLASSES)
        return engine.fit(model, TRAIN, EVAL, config, spec, checkpoint_dir, resume_from, callbacks)

    straight = fit(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "old", callbacks=[KillAfter(1)])
    last = tmp_path / "old" / "last.pt"
    old = _as_format_1(checkpoints.load_checkpoint(last), written_by_01)
    assert "crop_pct" not in old["config"]["data"] and old["config"]["model"]["name"] == "resnet18"
    checkpoints.save_checkpoint(last, old)
    model, read_spec = checkpoints.load_model(last)
    assert read_spec.name == "resnet18_cifar" and model.conv1.kernel_size == (3, 3)  # the CIFAR stem
    assert fit(resume_from=last).weights_sha256 == straight.weights_sha256


def test_a_manifest_of_schema_2_names_the_cifar_stem_net(tmp_path):
    values = json.loads((OLD_RUNS / "done" / "manifest.json").read_text())
    assert values["schema_version"] == 2
    values["config"]["model"]["name"] = values["model"]["name"] = "resnet18"  # as a resnet18 run of 0.1
    manifest = Manifest.model_validate(values)
    assert manifest.config.model.name == manifest.model.name == "resnet18_cifar"
    values["schema_version"] = 3  # written now: resnet18 is torchvision's
    assert Manifest.model_validate(values).config.model.name == "resnet18"
    assert build_config({"model": {"name": "resnet18"}}).model.name == "resnet18"  # a user's config: as written
