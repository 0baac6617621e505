"""The training device and its precision: which device a name means, and bf16 autocast on it."""

from __future__ import annotations

import torch

from visionflow.errors import DeviceError

DEVICE_NAMES = "auto, cpu, mps, cuda, cuda:N"


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda, then mps, then cpu; `cpu`, `mps`, `cuda`, `cuda:N` -> that device or DeviceError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "mps", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"Invalid device '{name}'. Choose from: {DEVICE_NAMES}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"Device '{name}' requested but CUDA is not available on this machine: use device 'auto' or 'cpu'"
        )
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise DeviceError(
            f"Device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if kind == "mps" and not _mps_available():
        raise DeviceError(
            f"Device '{name}' requested but MPS (Apple GPU) is not available on this machine: "
            "use device 'auto' or 'cpu'"
        )
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on `device` for precision 'bf16'; a disabled context for 'fp32'."""
    # bf16 keeps fp32's exponent range, so no GradScaler (loss scaling) is needed.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
