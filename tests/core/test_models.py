"""The model registry, the tutorial's convolution arithmetic and its network's shapes, ModelSpec."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REPO
from visionflow.config import MODEL_NAMES, build_config
from visionflow.errors import ConfigError
from visionflow.models import MODELS, build_model, head_name, summarize
from visionflow.train.records import ModelSpec

# The tutorial's F.conv2d example: a 5x5 input and a 3x3 kernel, as (N, C, H, W) tensors.
INPUT = torch.tensor([[1, 2, 0, 3, 1], [0, 1, 2, 3, 1], [1, 2, 1, 0, 3], [5, 2, 3, 1, 1], [2, 1, 0, 1, 1]]).reshape(
    1, 1, 5, 5
)
KERNEL = torch.tensor([[1, 2, 1], [0, 1, 0], [2, 1, 0]]).reshape(1, 1, 3, 3)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"stride": 1}, [[10, 12, 12], [18, 16, 16], [13, 9, 6]]),
        ({"stride": 2}, [[10, 12], [13, 6]]),
        (
            {"stride": 1, "padding": 1},
            [[1, 3, 4, 10, 8], [5, 10, 12, 12, 9], [7, 18, 16, 16, 11], [11, 13, 9, 6, 10], [14, 13, 9, 7, 4]],
        ),
    ],
)
def test_conv2d_matches_the_tutorial(kwargs, expected):
    out = F.conv2d(INPUT.float(), KERNEL.float(), **kwargs)
    assert out.shape == (1, 1, len(expected), len(expected))
    assert out.squeeze().tolist() == expected


def test_tudui_shape_walk_through():
    summary = summarize(build_model("tudui", 10), input_size=32)
    shapes = [(layer.kind, layer.output_shape[1:]) for layer in summary.layers]
    assert shapes == [
        ("Conv2d", [32, 32, 32]),
        ("MaxPool2d", [32, 16, 16]),
        ("Conv2d", [32, 16, 16]),
        ("MaxPool2d", [32, 8, 8]),
        ("Conv2d", [64, 8, 8]),
        ("MaxPool2d", [64, 4, 4]),
        ("Flatten", [1024]),
        ("Linear", [64]),
        ("Linear", [10]),
    ]


def test_tudui_parameter_count():
    # conv 3->32 5x5, conv 32->32 5x5, conv 32->64 5x5, linear 1024->64, linear 64->10 (weights + biases)
    expected = (3 * 32 * 25 + 32) + (32 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (1024 * 64 + 64) + (64 * 10 + 10)
    summary = summarize(build_model("tudui", 10))
    assert summary.num_parameters == summary.trainable_parameters == expected == 145_578
    assert sum(layer.num_parameters for layer in summary.layers) == expected
    assert "total parameters: 145,578" in summary.to_text()


def test_resnet18_cifar_keeps_spatial_size_on_32x32():
    model = build_model("resnet18_cifar", 10)
    summary = summarize(model, input_size=32)
    assert summary.layers[0].output_shape == [1, 64, 32, 32]  # 3x3 stride-1 stem, no max-pool
    last_conv = [layer for layer in summary.layers if layer.kind == "Conv2d"][-1]
    assert last_conv.output_shape[-2:] == [4, 4]
    assert summary.layers[-1].output_shape == [1, 10]
    assert 11_000_000 < summary.num_parameters < 11_300_000
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_summarize_restores_training_mode():
    model = build_model("resnet18_cifar", 3).train()
    summarize(model)
    assert model.training


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"Invalid model 'vgg'\. Choose from: tudui, resnet18_cifar, a torchvision"):
        build_model("vgg", 10)


def test_torchvision_and_timm_models_by_name_get_a_head_for_the_classes():
    standard = build_model("resnet18", 3)
    assert summarize(standard, input_size=64).layers[0].output_shape == [1, 64, 32, 32]  # 7x7 stride-2 stem
    assert head_name(standard) == "fc" and standard.fc.out_features == 3
    small = build_model("timm/resnet10t", 5)
    assert head_name(small) == "fc" and small(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
    assert head_name(build_model("tudui", 4)) == "8"  # the last Linear of the Sequential
    assert head_name(build_model("squeezenet1_0", 4)) == "classifier.1"  # a 1x1 Conv2d classifier


def test_the_standard_resnet18_costs_a_sixteenth_of_the_cifar_stem_at_224_px():
    standard, cifar = build_model("resnet18", 2), build_model("resnet18_cifar", 2)
    first_stage = [summarize(m, input_size=224).layers[4].output_shape for m in (standard, cifar)]
    assert first_stage == [[1, 64, 56, 56], [1, 64, 224, 224]]  # 16x the pixels in every later layer


@pytest.mark.parametrize(
    ("name", "close"),
    [
        ("resnet81", "resnet18"),
        ("timm/convnext_tinny", "convnext_tiny"),
        ("efficientnet_b9", "did you mean efficientnet_b"),
    ],
)
def test_an_unknown_name_in_the_config_is_one_line_with_close_matches(name, close):
    with pytest.raises(ConfigError) as caught:
        build_config({"model": {"name": name}})
    message = str(caught.value)
    assert "\n" not in message and f"'{name}'" in message and "did you mean" in message and close in message


def test_too_few_classes_is_a_config_error():
    with pytest.raises(ConfigError, match="num_classes 1"):
        build_model("tudui", 1)


def test_registry_names():
    assert sorted(MODELS) == ["resnet18_cifar", "tudui"]
    assert sorted(MODEL_NAMES) == sorted(MODELS)  # the config validates names without importing torch


def test_the_cli_and_the_flow_import_neither_torch_nor_pandas():
    # Only the steps that compute import torch (inside visionflow.steps), and only they use pandas:
    # a fully cached run never imports either (~2.5 s).
    # build_parser: every command's options, as `--help` builds them
    code = (
        "import sys, flows.cli, flows.train; flows.cli.build_parser(); "
        "print(sorted({'torch', 'torchvision', 'pandas'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_model_spec_round_trip_and_build():
    spec = ModelSpec("tudui", 2, 32, ["ants", "bees"], mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    again = ModelSpec.from_dict({**spec.to_dict(), "extra": "ignored"})
    assert again == spec
    assert again.build()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_model_spec_saved_before_test_flip_loads_without_it():
    values = ModelSpec("tudui", 2, 32, ["ants", "bees"], test_flip=True).to_dict()
    del values["test_flip"]
    assert ModelSpec.from_dict(values).test_flip is False


def test_model_spec_missing_fields():
    with pytest.raises(ConfigError, match="missing class_names, input_size"):
        ModelSpec.from_dict({"name": "tudui", "num_classes": 2})


def test_whitened_first_layer_decorrelates_the_patches_it_sees(cifar_mini) -> None:
    from visionflow.data.decoded import decode_file
    from visionflow.models import WHITEN_SCALE, whiten_first_conv

    files = sorted((cifar_mini / "train").rglob("*.jpg"))[::25]  # 200 photos, every class
    images = torch.from_numpy(np.stack([decode_file(path, 32) for path in files]))  # (200, 3, 32, 32) uint8
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    model = build_model("tudui", 10)
    untouched = [p.detach().clone() for p in model.parameters()][2:]
    rng = torch.random.get_rng_state()
    whiten_first_conv(model, images, mean, std)
    assert torch.equal(torch.random.get_rng_state(), rng)  # deterministic: the training's random streams stay put
    assert all(torch.equal(a, b) for a, b in zip(untouched, list(model.parameters())[2:]))  # only the first layer
    conv = model[0]
    assert torch.equal(conv.bias, torch.zeros(32))
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        out = F.conv2d(x, conv.weight)  # (N, 32, 28, 28): the valid patches the covariance came from
    responses = out.transpose(0, 1).reshape(32, -1)
    covariance = torch.cov(responses.double()) / WHITEN_SCALE**2  # (32, 32): ~identity where whitened
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    assert off_diagonal.abs().max() < 1e-3  # decorrelated
    assert ((0.5 < torch.diagonal(covariance)) & (torch.diagonal(covariance) < 1.0 + 1e-6)).all()  # ~unit variance
    again = build_model("tudui", 10)
    whiten_first_conv(again, images, mean, std)
    assert torch.equal(again[0].weight, conv.weight)  # the same images give the same filters
