"""Checkpoints and exports: safe (weights-only) loading and model rebuilding.

Every write is atomic (``fileio.atomic_write``): a crash at any moment leaves the previous file
intact. Every read
of a ``.pt`` file uses ``torch.load(weights_only=True)``: a file that would run code on
unpickling is refused with ``CheckpointError`` before anything in it executes. The only
exception is ``load_whole_module``, which demands an explicit ``trust=True``.

The tutorial's two ways to save and load are public API: the whole module
(``save_whole_module``/``load_whole_module``) and the state_dict (``save_state_dict``/``load_state_dict``);
``examples/tutorial.py`` shows both predicting the same.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from torch import nn

from visionflow.config import MODEL_RENAMES, stored_config
from visionflow.errors import CheckpointError, VisionflowError
from visionflow.fileio import atomic_write, atomic_write_bytes, atomic_write_json
from visionflow.runs import EXPORT_SPEC, EXPORT_WEIGHTS
from visionflow.train.records import ModelSpec

# The training checkpoint's and the export spec's layout; readers refuse newer ones. 2: model names
# as config.MODEL_RENAMES has them (format 1 files are read with their names renamed).
FORMAT_VERSION = 2


@dataclass(frozen=True)
class TrainingCheckpoint:
    """A training checkpoint: its fields are the file's keys, the one definition of its schema (as
    the torchvision references' one ``checkpoint`` dict). ``save_checkpoint`` writes ``to_dict()``,
    ``load_checkpoint`` reads the dict back and ``from_dict`` gives it these fields again."""

    model: dict[str, Any]  # the model's state_dict (the unwrapped module's in a distributed run)
    optimizer: dict[str, Any]  # the optimizer's state_dict
    scheduler: dict[str, Any]  # the per-batch learning-rate schedule's state_dict
    epoch: int  # the last finished epoch, 1-based
    step: int  # optimizer steps so far
    rng: dict[str, Any]  # the seeded random streams (visionflow.train.rng.rng_state)
    config: dict[str, Any]  # the resolved PipelineConfig, as JSON values
    spec: dict[str, Any]  # ModelSpec.to_dict(): what load_model rebuilds the model from
    metrics: dict[str, Any]  # the last epoch's figures and the run's totals so far
    history: list[dict[str, Any]]  # every finished epoch's EpochMetrics
    best_metric: float | None  # the best value of training.monitor so far (None: no epoch yet)
    best_epoch: int | None  # the epoch that reached best_metric
    world_size: int  # ranks that trained it: its random streams continue only at this size
    scaler: Any = None  # no loss scaling: training is fp32 or bf16 autocast
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as the file stores it (tensors shared, not copied)."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "TrainingCheckpoint":
        """A loaded checkpoint's fields; keys it predates take their value from ADDED_KEYS."""
        return cls(**{name: state[name] if name in state else ADDED_KEYS[name] for name in _FIELDS})


_FIELDS = tuple(field.name for field in fields(TrainingCheckpoint))
# Keys added after checkpoints were first written -> what an older file without them means.
ADDED_KEYS: dict[str, Any] = {"world_size": 1}  # before distributed training: trained in one process
TRAINING_KEYS = frozenset(_FIELDS) - ADDED_KEYS.keys()  # every training checkpoint has these
EXPECTED_MODEL_FILE = "a training checkpoint (.pt), an export folder, or a .safetensors file beside its .json spec"
# Leaf types a weights-only torch.load accepts (exact types: a numpy.float64 is a float subclass
# that the weights-only unpickler refuses).
_SAFE_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_SAFE_CONTAINER_TYPES = (dict, OrderedDict, list, tuple)
_MAX_LISTED_KEYS = 5


# ---------------------------------------------------------------------------------------------
# Training checkpoints


def _unsafe_entry(value: Any, where: str) -> str | None:
    """The first entry (as ``state['rng']['numpy']``) a weights-only load would refuse, else None."""
    if isinstance(value, torch.Tensor) or type(value) in _SAFE_LEAF_TYPES:
        return None
    if type(value) not in _SAFE_CONTAINER_TYPES:
        return f"{where} ({type(value).__module__}.{type(value).__qualname__})"
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        found = _unsafe_entry(key, f"{where} key {key!r}") or _unsafe_entry(item, f"{where}[{key!r}]")
        if found:
            return found
    return None


def _validate_training_state(state: Mapping[str, Any]) -> None:
    missing = sorted(TRAINING_KEYS - set(state))
    if missing:
        raise CheckpointError(
            f"Training checkpoint state is missing {', '.join(missing)}: "
            f"expected keys {', '.join(sorted(TRAINING_KEYS))}"
        )
    unsafe = _unsafe_entry(dict(state), "state")
    if unsafe:
        raise CheckpointError(
            f"Training checkpoint entry {unsafe} cannot be read back with weights_only=True: "
            "expected tensors, numbers, strings, None, and dicts/lists/tuples of them"
        )


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Atomically ``torch.save`` a training checkpoint dict (all ``TRAINING_KEYS``, weights-only safe)."""
    _validate_training_state(state)
    return atomic_write(path, lambda handle: torch.save(dict(state), handle))


def _one_line_load_error(err: Exception) -> str:
    """Reduce a loader's multi-paragraph message to 'ErrorType: the sentence that names the cause'."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
    sentence = cause.split("WeightsUnpickler error:")[-1].split(". ")[0].strip().rstrip(".")
    return f"{type(err).__name__}: {sentence[:200]}" if sentence else type(err).__name__


def load_weights_only(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a missing, corrupt or code-carrying file -> CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' not found: expected {EXPECTED_MODEL_FILE}")
    try:
        with warnings.catch_warnings():
            # A foreign pickle protocol only warns; the load then fails or succeeds on its own.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    # Anything a deserializer can raise (UnpicklingError, RuntimeError from the zip reader,
    # EOFError, KeyError on garbage...) means the same to the user: not a loadable checkpoint.
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"Checkpoint '{path}' was refused by the safe (weights_only) loader: {_one_line_load_error(err)}; "
            "expected an uncorrupted file of tensors and plain values written by visionflow"
        ) from None


def is_training_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) has every key of a visionflow training checkpoint."""
    return isinstance(obj, dict) and TRAINING_KEYS <= set(obj)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint with ``weights_only=True``; anything else -> CheckpointError."""
    path = Path(path)
    state = load_weights_only(path, map_location)
    if not is_training_checkpoint(state):
        found = (
            ", ".join(sorted(map(str, state))[:_MAX_LISTED_KEYS]) if isinstance(state, dict) else type(state).__name__
        )
        raise CheckpointError(
            f"File '{path}' is not a visionflow training checkpoint: found {found or 'an empty dict'}, "
            f"expected keys {', '.join(sorted(TRAINING_KEYS))}"
        )
    if not isinstance(state["format_version"], int) or state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint '{path}' has format_version {state['format_version']!r}: "
            f"this visionflow reads versions up to {FORMAT_VERSION}"
        )
    if state["format_version"] < FORMAT_VERSION and isinstance(state["config"], dict):
        state["config"] = stored_config(state["config"], renamed=False)
        state["spec"] = upgraded_spec(state["spec"], state["format_version"])
    return state


def upgraded_spec(values: Any, format_version: int) -> Any:
    """A stored spec dict of `format_version` read as this format's: model names renamed before 2."""
    if format_version < 2 and isinstance(values, dict) and values.get("name") in MODEL_RENAMES:
        return {**values, "name": MODEL_RENAMES[values["name"]]}
    return values


# ---------------------------------------------------------------------------------------------
# Weights: hashing and applying to a model


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted tensor names, dtypes, shapes and bytes; identical for .pt and safetensors."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED_KEYS])
    more = len(names) - _MAX_LISTED_KEYS
    return f"{shown} (+{more} more)" if more > 0 else shown


def mismatch_summary(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any]) -> str:
    """'missing keys a, b; unexpected keys c; shape mismatches d (file [2] vs model [3])', or ''."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(str(name) for name in set(found) - set(expected))
    shapes = [
        f"{name} (file {list(found[name].shape)} vs model {list(tensor.shape)})"
        for name, tensor in sorted(expected.items())
        if name in found and isinstance(found[name], torch.Tensor) and found[name].shape != tensor.shape
    ]
    not_tensors = sorted(name for name in set(found) & set(expected) if not isinstance(found[name], torch.Tensor))
    parts = [
        (label, names)
        for label, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
            ("non-tensor entries", not_tensors),
        )
        if names
    ]
    return "; ".join(f"{label} {_listed(names)}" for label, names in parts)


def apply_state_dict(model: nn.Module, state_dict: Any, source: str | Path) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly; a wrong architecture -> one-line CheckpointError."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(
            f"'{source}' holds a {type(state_dict).__name__}, expected a state_dict (dict of tensors)"
        )
    mismatch = mismatch_summary(model.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f"Weights in '{source}' do not fit {type(model).__name__}: {mismatch}")
    model.load_state_dict(state_dict, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# Rebuilding a model from its spec


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_number_triple(values: Any, positive: bool = False) -> bool:
    """Whether ``values`` is a list of 3 numbers (all > 0 when ``positive``), as per-channel stats are."""
    return (
        isinstance(values, (list, tuple))
        and len(values) == 3
        and all(_is_number(v) and (v > 0 or not positive) for v in values)
    )


def _spec_problems(spec: ModelSpec) -> list[str]:
    """What makes a stored spec unusable: class names that disagree with num_classes, bad size or stats."""
    checks = [
        (
            isinstance(spec.class_names, (list, tuple))
            and len(spec.class_names) == spec.num_classes
            and all(isinstance(c, str) for c in spec.class_names),
            f"num_classes {spec.num_classes!r} does not match class_names {spec.class_names!r}",
        ),
        (
            type(spec.input_size) is int and spec.input_size >= 1,
            f"input_size {spec.input_size!r} is not a positive int",
        ),
        (_is_number_triple(spec.mean), f"mean {spec.mean!r} is not 3 numbers"),
        (_is_number_triple(spec.std, positive=True), f"std {spec.std!r} is not 3 positive numbers"),
    ]
    return [problem for ok, problem in checks if not ok]


def _spec_from(values: Any, source: str | Path) -> ModelSpec:
    """Validate a stored spec dict into a ModelSpec; anything unusable -> CheckpointError."""
    if not isinstance(values, dict):
        raise CheckpointError(f"Model spec in '{source}' is a {type(values).__name__}, expected a dict")
    try:
        spec = ModelSpec.from_dict(values)
    except VisionflowError as err:
        raise CheckpointError(f"Model spec in '{source}' is invalid: {err}") from None
    problems = _spec_problems(spec)
    if problems:
        raise CheckpointError(f"Model spec in '{source}' is inconsistent: {'; '.join(problems)}")
    return spec


def _build(spec: ModelSpec, source: str | Path) -> nn.Module:
    try:
        return spec.build()
    except VisionflowError as err:
        raise CheckpointError(f"Cannot rebuild the model of '{source}': {err}") from None


def is_export(path: Path) -> bool:
    """Whether ``path`` names an export: its folder or its ``.safetensors`` weights file."""
    return path.is_dir() or path.suffix == ".safetensors"


def _export_files(path: Path) -> tuple[Path, Path]:
    """(weights, spec) of an export given as its folder or its .safetensors file."""
    weights = path / EXPORT_WEIGHTS if path.is_dir() else path
    spec = weights.with_suffix(".json")
    for required in (weights, spec):
        if not required.is_file():
            raise CheckpointError(f"Export file '{required}' not found: expected {EXPECTED_MODEL_FILE}")
    return weights, spec


def _read_export_spec(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Export spec '{path}' is not valid JSON: {err}") from None


def read_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device=str(map_location))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError for any bad header
        raise CheckpointError(
            f"Export weights '{path}' cannot be read: {_one_line_load_error(err)}; "
            "it is truncated, corrupt, or not a safetensors file"
        ) from None


def _load_export(path: Path, map_location: str | torch.device) -> tuple[nn.Module, ModelSpec]:
    weights_path, spec_path = _export_files(path)
    values = _read_export_spec(spec_path)
    spec = _spec_from(upgraded_spec(values, values.get("format_version", 1)), spec_path)
    weights = read_safetensors(weights_path, map_location)
    expected_sha = values.get("weights_sha256")
    if expected_sha is not None and weights_sha256(weights) != expected_sha:
        raise CheckpointError(
            f"Export weights '{weights_path}' do not match the weights_sha256 in '{spec_path}': "
            "the two files come from different exports"
        )
    return apply_state_dict(_build(spec, weights_path), weights, weights_path), spec


def _load_training_checkpoint(path: Path, map_location: str | torch.device) -> tuple[nn.Module, ModelSpec]:
    state = load_checkpoint(path, map_location)
    spec = _spec_from(state["spec"], path)
    return apply_state_dict(_build(spec, path), state["model"], path), spec


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model (in eval mode) through the registry from a training checkpoint or an export."""
    path = Path(path)
    loader = _load_export if is_export(path) else _load_training_checkpoint
    model, spec = loader(path, map_location)
    return model.eval(), spec


# ---------------------------------------------------------------------------------------------
# Exports and the tutorial's two ways to save and load


def export_model(model: nn.Module, spec: ModelSpec, out_dir: str | Path) -> dict:
    """Write ``model.safetensors`` (weights only) and ``model.json`` (the spec) atomically.

    Returns ``{"weights": path, "spec": path, "weights_sha256": hex}``. The spec is written last,
    so a folder holding ``model.json`` always holds the matching weights.
    """
    out_dir = Path(out_dir)
    _spec_from(spec.to_dict(), out_dir)
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    sha = weights_sha256(state)
    weights = atomic_write_bytes(out_dir / EXPORT_WEIGHTS, safetensors.torch.save(state))
    spec_file = atomic_write_json(
        out_dir / EXPORT_SPEC, {**spec.to_dict(), "weights_sha256": sha, "format_version": FORMAT_VERSION}
    )
    return {"weights": str(weights), "spec": str(spec_file), "weights_sha256": sha}


def save_whole_module(model: nn.Module, path: str | Path) -> Path:
    """The tutorial's first way to save: ``torch.save(model)``, structure and weights in one pickle.

    Loading it back needs the model's class importable and ``load_whole_module(trust=True)``:
    unpickling runs code. Prefer ``save_state_dict`` for a file anyone else may load."""
    return atomic_write(path, lambda handle: torch.save(model, handle))


def load_whole_module(path: str | Path, trust: bool = False) -> nn.Module:
    """The tutorial's first way to load: ``torch.load(path)`` of a ``save_whole_module`` file, on the CPU.

    Refused unless ``trust=True`` (unpickling can run arbitrary code): pass it only for a file you wrote."""
    path = Path(path)
    if not trust:
        raise CheckpointError(
            f"Refusing to load whole-module file '{path}': unpickling an nn.Module can run arbitrary code; "
            "pass trust=True only for a file you created, or use load_model/load_state_dict"
        )
    if not path.is_file():
        raise CheckpointError(f"Whole-module file '{path}' not found: expected a file written by save_whole_module")
    try:
        module = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same: not loadable
        raise CheckpointError(f"Whole-module file '{path}' cannot be loaded: {_one_line_load_error(err)}") from None
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"File '{path}' holds a {type(module).__name__}, expected an nn.Module")
    return module


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """The tutorial's second (recommended) way to save: ``torch.save(model.state_dict())``, the weights only.

    Load them with ``load_state_dict`` into a freshly built model of the same architecture."""
    return atomic_write(path, lambda handle: torch.save(model.state_dict(), handle))


def load_state_dict(model: nn.Module, path: str | Path) -> nn.Module:
    """The tutorial's second way to load: ``model.load_state_dict(torch.load(path))``, safely.

    Reads with ``weights_only=True`` and loads strictly (a wrong architecture is one CheckpointError
    line naming the mismatched keys); also takes a training checkpoint (its ``model`` entry)."""
    path = Path(path)
    state = load_weights_only(path, "cpu")
    weights = state["model"] if is_training_checkpoint(state) else state
    return apply_state_dict(model, weights, path)
