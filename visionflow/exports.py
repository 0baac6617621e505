"""Portable exports with proof: a checkpoint, export folder or champion written as ONNX, TorchScript
or safetensors, each beside its spec JSON (classes, input size, normalization), and written only
when the copy predicts what the original does.

Decisions:
- What is exported is the model with its head: images in (normalized as the spec says, any batch
  size), class probabilities out (softmax, averaged with the mirror image's when the spec's
  test_flip is on, as `engine.collect_logits` does), so a consumer needs only the spec's
  preprocessing.
- Parity: the original (PyTorch, CPU) and the export, run by its own runtime (onnxruntime,
  torch.jit, `checkpoints.load_model`), score up to PARITY_IMAGES images of the run's eval split
  (or the images given) in one batch; a max probability difference above PARITY_TOLERANCE is a
  CheckpointError and nothing is written. Files are staged in a temporary folder beside the
  target and moved in with the spec JSON last: a folder with a spec holds a checked export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from visionflow.checkpoints import FORMAT_VERSION, export_model, load_checkpoint, load_model, weights_sha256
from visionflow.config import ExportFormat
from visionflow.errors import CheckpointError, ConfigError, DatasetError, make_directory
from visionflow.fileio import atomic_write_json
from visionflow.runs import EXPORT_SPEC, EXPORT_WEIGHTS
from visionflow.train.records import ModelSpec

EXPORT_FILES: dict[str, str] = {
    "onnx": "model.onnx",
    "torchscript": "model.torchscript.pt",
    "safetensors": EXPORT_WEIGHTS,
}
# float32 kernels of two runtimes sum in different orders: their probabilities differ by ~1e-7..1e-6;
# a wrong weight, op or preprocessing moves some probability by far more than 1e-4.
PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 64  # enough images to exercise every class of a small eval split; one batch on any CPU
ONNX_OPSET = 18  # the opset torch 2.14's exporter writes natively (no version conversion)
EXPORT_EXPECTED = "a folder for the export (--out)"


class Probabilities(nn.Module):
    """A classifier as exported: images -> class probabilities, with the spec's test-time flip."""

    def __init__(self, model: nn.Module, flip: bool) -> None:
        super().__init__()
        self.model, self.flip = model, flip
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        logits = self.model(images)
        if self.flip:
            logits = (logits + self.model(images.flip(-1))) / 2  # flip(-1): mirror the width
        return logits.softmax(dim=1)


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    format: str
    file: Path
    spec: Path
    max_difference: float
    images: int

    def to_dict(self) -> dict[str, Any]:
        return {name: str(value) if isinstance(value, Path) else value for name, value in self.__dict__.items()}


# ---------------------------------------------------------------------------------------------
# Writing and running each format


def write_format(fmt: ExportFormat, model: nn.Module, spec: ModelSpec, folder: Path) -> Path:
    """Write `model` (its probabilities, see `Probabilities`) in `fmt` into `folder`; the file written."""
    target = folder / EXPORT_FILES[fmt]
    if fmt == "safetensors":
        export_model(model, spec, folder)
        return target
    wrapped = Probabilities(model, spec.test_flip)
    example = torch.zeros(2, 3, spec.input_size, spec.input_size)  # batch 2: the batch axis stays symbolic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapped, example), str(target))
            return target
        torch.onnx.export(
            wrapped,
            (example,),
            str(target),
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=ONNX_OPSET,
            external_data=False,
            verbose=False,
        )
    import onnx

    onnx.checker.check_model(str(target), full_check=True)
    return target


def format_runner(fmt: ExportFormat, file: Path, spec: ModelSpec) -> Callable[[Tensor], Tensor]:
    """The export in `file` loaded by its own runtime: a (N, 3, S, S) batch -> (N, C) probabilities."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(file), map_location="cpu")
        return module
    model, loaded = load_model(file)
    return Probabilities(model, loaded.test_flip)


def max_difference(model: nn.Module, spec: ModelSpec, fmt: ExportFormat, file: Path, images: Tensor) -> float:
    """The largest difference between the probabilities of `model` and of the export in `file`."""
    with torch.inference_mode():
        expected = Probabilities(model, spec.test_flip)(images)
        found = format_runner(fmt, file, spec)(images)
    if found.shape != expected.shape:
        return float("inf")
    return float((found.float() - expected).abs().max().nan_to_num(float("inf")))


# ---------------------------------------------------------------------------------------------
# The images the parity check runs on


def _run_config(path: Path) -> Any:
    """The config of the run a model comes from: a checkpoint's own, else the manifest beside an
    export or champion folder; None when there is none."""
    from visionflow.config import build_config
    from visionflow.manifest import MANIFEST_NAME, Manifest

    if path.is_file() and path.suffix == ".pt":
        return build_config(load_checkpoint(path)["config"])
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder.parent):  # a champion's version folder, a run's export/
        if (candidate / MANIFEST_NAME).is_file():
            return Manifest.load(candidate).config
    return None


def parity_files(path: Path, images: str | None) -> list[Path]:
    """Up to PARITY_IMAGES files spread over `images` (scoring.INPUTS_HELP) when given, else over
    the eval split of the dataset the model at `path` was trained on."""
    from visionflow.data.splits import resolve_dataset
    from visionflow.scoring import resolve_inputs

    if images is not None:
        files = resolve_inputs(images)
    else:
        config = _run_config(path)
        if config is None:
            raise ConfigError(f"No images to check the export of '{path}' on: its run is unknown; give --images")
        data = config.data
        try:
            info = resolve_dataset(data.dataset, data.data_dir, data.val_fraction, data.split_seed, download=False)
        except DatasetError as err:
            raise ConfigError(f"No images to check the export of '{path}' on ({err}); give --images") from None
        files = list(info.eval_split.files)
    return files[:: max(1, len(files) // PARITY_IMAGES)][:PARITY_IMAGES]


def _decode(files: list[Path], spec: ModelSpec) -> Tensor:
    from visionflow.data.images import load_rgb, thread_map
    from visionflow.evaluation import input_pipeline

    pipeline = input_pipeline(spec)
    return torch.stack(thread_map(lambda file: pipeline(load_rgb(file)), files))


# ---------------------------------------------------------------------------------------------
# The export


def export_checked(path: Path, fmt: ExportFormat, out_dir: Path | str, images: str | None = None) -> ExportResult:
    """Export the model at `path` (a checkpoint or an export folder) in `fmt` into `out_dir`, with
    its spec JSON, once it agrees with the original within PARITY_TOLERANCE; else CheckpointError."""
    model, spec = load_model(path)
    batch = _decode(parity_files(path, images), spec)
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(dir=make_directory(out_dir.parent, EXPORT_EXPECTED), prefix=".export-"))
    try:
        file = write_format(fmt, model, spec, staging)
        difference = max_difference(model, spec, fmt, file, batch)
        if not difference <= PARITY_TOLERANCE:
            raise CheckpointError(
                f"Refused the {fmt} export of '{path}': its probabilities differ from the original's by up to "
                f"{difference:.3g} on {len(batch)} images, above the tolerance {PARITY_TOLERANCE:g}; nothing written"
            )
        parity = {"images": len(batch), "max_difference": difference, "tolerance": PARITY_TOLERANCE}
        values = {**spec.to_dict(), "weights_sha256": weights_sha256(model.state_dict())}
        atomic_write_json(
            staging / EXPORT_SPEC,
            {**values, "format_version": FORMAT_VERSION, "format": fmt, "file": file.name, "parity": parity},
        )
        make_directory(out_dir, EXPORT_EXPECTED)
        os.replace(file, out_dir / file.name)
        os.replace(staging / EXPORT_SPEC, out_dir / EXPORT_SPEC)  # last: a spec names a checked file
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir, fmt, out_dir / file.name, out_dir / EXPORT_SPEC, difference, len(batch))
