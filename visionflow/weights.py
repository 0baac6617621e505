"""Pretrained weights (model.weights): which file they are, its sha256, the preprocessing they were
trained with, and loading them into a model whose classifier head is new.

Sources (config.ModelConfig.weights):
- ``imagenet``: the model's default pretrained weights. torchvision's come from the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``), timm's from the Hugging Face cache (``$HF_HOME/hub``); either is
  downloaded when missing and the network is there. torchvision's file name carries the start of its
  sha256 and a file that does not match it is refused, cached or not.
- a local ``.pt``/``.pth``/``.safetensors`` file: a state dict (torchvision's, timm's), a visionflow
  training checkpoint or export.
- ``run:NAME``: that run's best.pt; ``champion:SLOT``: the slot's champion export.

Every file is read weights-only (``torch.load(weights_only=True)`` or safetensors): nothing in it runs.
torch is imported only where weights are read or fetched: `model.weights: none` costs a run nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

from visionflow.config import (
    MODEL_NAMES,
    TIMM_PREFIX,
    WEIGHTS_CHAMPION,
    WEIGHTS_IMAGENET,
    WEIGHTS_NONE,
    WEIGHTS_RUN,
    ModelConfig,
    PipelineConfig,
)
from visionflow.errors import CheckpointError, ConfigError
from visionflow.runs import EXPORT_WEIGHTS, RunLayout, runs_root

if TYPE_CHECKING:
    import torch
    from torch import nn

_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing a weights file


@dataclass(frozen=True)
class PretrainedWeights:
    """A located weights file and what its weights expect of their input (None: they do not say)."""

    source: str  # model.weights as configured
    path: str  # the file read
    sha256: str  # of that file's bytes
    image_size: int | None = None  # input size they were trained at
    crop_pct: float | None = None  # eval center crop (input size / resize size)
    mean: list[float] | None = None  # normalization, per channel on [0, 1] pixels
    std: list[float] | None = None


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _torchvision_meta(name: str) -> tuple[Any, dict[str, Any]]:
    """(torchvision's default weights enum member of `name`, its preprocessing metadata)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise ConfigError(
            f"Invalid model.weights 'imagenet': torchvision has no pretrained weights for '{name}'"
        ) from None
    preprocess = weights.transforms()
    crop, resize = preprocess.crop_size[0], preprocess.resize_size[0]
    meta = {"image_size": crop, "crop_pct": crop / resize, "mean": list(preprocess.mean), "std": list(preprocess.std)}
    return weights, meta


def _timm_meta(name: str) -> tuple[Any, dict[str, Any]]:
    """(timm's pretrained config of `name` (with its tag, if any), its preprocessing metadata)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"Invalid model.weights 'imagenet': timm has no pretrained weights for '{name}'")
    meta = {"image_size": cfg.input_size[-1], "crop_pct": cfg.crop_pct, "mean": list(cfg.mean), "std": list(cfg.std)}
    return cfg, meta


def default_meta(model_name: str) -> dict[str, Any]:
    """The preprocessing of `model_name`'s default pretrained weights (input size, crop_pct, mean,
    std), read from the library's metadata without downloading anything; {} for visionflow's own."""
    if model_name in MODEL_NAMES:
        return {}
    if model_name.startswith(TIMM_PREFIX):
        return _timm_meta(model_name.removeprefix(TIMM_PREFIX))[1]
    return _torchvision_meta(model_name)[1]


def _hub_file(url: str, download: bool) -> Path:
    """`url`'s file in the torch hub cache, downloaded when missing (and `download`); a name carrying a
    sha256 prefix (resnet18-f37072fd.pth) must match the file's sha256."""
    import torch

    name = url.rsplit("/", 1)[-1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / name
    match = torch.hub.HASH_REGEX.search(name)
    prefix = match.group(1) if match else None
    if not path.is_file():
        if not download:
            raise ConfigError(f"ImageNet weights '{name}' are not in {folder}: download {url} into that folder")
        try:
            reason = _unreachable(url)  # then nothing is created on disk
            if reason is None:
                folder.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=False)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
            reason = str(getattr(err, "reason", err)).splitlines()[0]
        if reason is not None:
            raise ConfigError(
                f"ImageNet weights '{name}' are not in {folder} and cannot be downloaded ({reason}): "
                f"place {name} in {folder} (from {url})"
            ) from None
    if prefix is not None:
        found = file_sha256(path)
        if not found.startswith(prefix):
            raise CheckpointError(
                f"ImageNet weights '{path}' fail the hash check (sha256 {found[:12]}..., the file name says "
                f"{prefix}...): delete it and download {url} again"
            )
    return path


def _unreachable(url: str) -> str | None:
    """Why `url`'s host cannot be reached, when its name does not resolve and no proxy is set (a
    proxy resolves names itself); None otherwise."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host = urlsplit(url).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"{host}: {err.strerror or err}"
    return None


def _hf_file(hub_id: str, download: bool) -> Path:
    """timm's weights file of Hugging Face repo `hub_id` from the Hugging Face cache, downloaded when
    missing (and `download`)."""
    from huggingface_hub import constants, hf_hub_download

    filename = "model.safetensors"  # what timm's Hugging Face repositories hold
    try:
        return Path(hf_hub_download(hub_id, filename, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: any of huggingface_hub's "not found locally" errors
        pass
    url = f"{constants.ENDPOINT}/{hub_id}/resolve/main/{filename}"
    if download:
        reason = _unreachable(url)  # huggingface_hub would retry an unreachable host for ~25 s
        try:
            if reason is None:
                return Path(hf_hub_download(hub_id, filename))
        except Exception as err:  # noqa: BLE001 - offline, no such repo, refused: all end here
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"ImageNet weights {filename} of {hub_id} are not in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"and cannot be downloaded ({reason}): download {url} and pass that file as model.weights"
        )
    raise ConfigError(f"ImageNet weights {filename} of {hub_id} are not cached: download {url}")


def _imagenet(model_name: str, download: bool) -> tuple[Path, dict[str, Any]]:
    if model_name in MODEL_NAMES:
        raise ConfigError(
            f"Invalid model.weights 'imagenet': '{model_name}' is visionflow's own model, with no pretrained "
            "weights; use a torchvision or timm/ model, or run:NAME / a local file"
        )
    if model_name.startswith(TIMM_PREFIX):
        cfg, meta = _timm_meta(model_name.removeprefix(TIMM_PREFIX))
        return (_hf_file(cfg.hf_hub_id, download) if cfg.hf_hub_id else _hub_file(cfg.url, download)), meta
    weights, meta = _torchvision_meta(model_name)
    return _hub_file(weights.url, download), meta


def _visionflow_meta(path: Path) -> dict[str, Any]:
    """The preprocessing a visionflow checkpoint or export records in its spec; {} for a plain state dict."""
    from visionflow import checkpoints

    if path.suffix == ".safetensors":
        spec_file = path.with_suffix(".json")
        spec = json.loads(spec_file.read_text(encoding="utf-8")) if spec_file.is_file() else None
    else:
        state = checkpoints.load_weights_only(path)
        spec = state.get("spec") if checkpoints.is_training_checkpoint(state) else None
    if not isinstance(spec, dict):
        return {}
    return {
        "image_size": spec.get("input_size"),
        "crop_pct": spec.get("crop_pct", 1.0),
        "mean": spec.get("mean"),
        "std": spec.get("std"),
    }


def _source_file(weights: str, output_dir: Path | str) -> Path:
    """The file model.weights `run:NAME`, `champion:SLOT` or a path names; it must exist."""
    from visionflow.champion import read_champion  # here: champion imports evaluation, which imports torchvision

    if weights.startswith(WEIGHTS_RUN):
        path = RunLayout(runs_root(output_dir) / weights.removeprefix(WEIGHTS_RUN)).best_checkpoint
        expected = f"a run under {runs_root(output_dir)} with a best checkpoint"
    elif weights.startswith(WEIGHTS_CHAMPION):
        champion = read_champion(output_dir, weights.removeprefix(WEIGHTS_CHAMPION))
        if champion is None:
            raise ConfigError(f"Invalid model.weights '{weights}': that champion slot is empty under {output_dir}")
        path, expected = champion.path / EXPORT_WEIGHTS, "a champion export"
    else:
        path, expected = Path(weights), "a .pt, .pth or .safetensors weights file"
    if not path.is_file():
        raise ConfigError(f"Invalid model.weights '{weights}': '{path}' does not exist (expected {expected})")
    return path


def locate(model: ModelConfig, output_dir: Path | str, download: bool = True) -> PretrainedWeights | None:
    """The file model.weights names (None for `none`), hashed, with the preprocessing its weights
    expect: the library's metadata for `imagenet` and plain state dicts of a library model, the spec
    of a visionflow checkpoint or export. With model.weights_sha256 set, another file is refused."""
    if model.weights == WEIGHTS_NONE:
        return None
    if model.weights == WEIGHTS_IMAGENET:
        path, meta = _imagenet(model.name, download)
    else:
        path = _source_file(model.weights, output_dir)
        meta = _visionflow_meta(path) or default_meta(model.name)
    sha256 = file_sha256(path)
    if model.weights_sha256 is not None and sha256 != model.weights_sha256:
        raise CheckpointError(
            f"Weights '{path}' (model.weights {model.weights}) have sha256 {sha256[:12]}..., the run recorded "
            f"{model.weights_sha256[:12]}...: the file changed since; restore it or leave model.weights_sha256 empty"
        )
    return PretrainedWeights(source=model.weights, path=str(path), sha256=sha256, **meta)


def with_weights(config: PipelineConfig, weights: PretrainedWeights | None) -> PipelineConfig:
    """`config` with the fields it leaves empty that the weights have an answer for (data.image_size,
    crop_pct, mean, std) filled from them, and model.weights_sha256 recorded."""
    if weights is None:
        return config
    data = config.data.model_dump()
    for key in ("image_size", "crop_pct", "mean", "std"):
        if data[key] is None:
            data[key] = getattr(weights, key)
    model = config.model.model_copy(update={"weights_sha256": weights.sha256})
    return config.model_copy(update={"data": config.data.model_validate(data), "model": model})


def read_state_dict(path: Path | str) -> dict[str, "torch.Tensor"]:
    """The weights in a file: a .safetensors file, a visionflow training checkpoint's model, a
    training script's checkpoint with a "state_dict" or "model" entry, or a plain state dict;
    DistributedDataParallel's "module." prefix removed."""
    import torch

    from visionflow import checkpoints

    path = Path(path)
    if path.suffix == ".safetensors":
        state: Any = checkpoints.read_safetensors(path, "cpu")
    else:
        state = checkpoints.load_weights_only(path)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"Weights file '{path}' holds a {type(state).__name__}: expected a state dict")
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"Weights file '{path}' holds no tensors: expected a state dict")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def load_pretrained(model: "nn.Module", weights: PretrainedWeights) -> None:
    """Copy `weights` into `model`, all but its classifier head (`models.head_name`), which keeps its
    fresh initialization for the dataset's classes. Every other parameter and buffer must be in the
    file with its shape, and the file must still have the sha256 it was located with."""
    from visionflow import checkpoints
    from visionflow.models import head_name, is_head

    if file_sha256(weights.path) != weights.sha256:
        raise CheckpointError(f"Weights '{weights.path}' changed since they were located: run again")
    head = head_name(model)
    state = {k: v for k, v in read_state_dict(weights.path).items() if not is_head(k, head)}
    expected = {k: v for k, v in model.state_dict().items() if not is_head(k, head)}
    if state.keys() != expected.keys() or any(state[k].shape != v.shape for k, v in expected.items()):
        raise CheckpointError(
            f"Weights '{weights.path}' ({weights.source}) do not fit {type(model).__name__} "
            f"(head '{head}' left out): {checkpoints.mismatch_summary(expected, state)}"
        )
    model.load_state_dict(state, strict=False)
