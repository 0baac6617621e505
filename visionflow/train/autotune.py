"""`training.precision: auto` and `training.channels_last: auto`: the fast settings for the device
that trains, decided from what the hardware does, once per machine.

CUDA: bf16 where `torch.cuda.is_bf16_supported()`, channels_last on (tensor cores prefer NHWC).
MPS: fp32, NCHW. CPU: bf16 where it is native (AVX512-BF16 or AMX-BF16 in the CPU flags, and
PyTorch's AVX512 kernels in use: 2-3x fp32 for tudui on such a Xeon), else fp32 (emulated bf16 is
~10x slower than fp32 on AMD Zen 3, and on that Xeon capped with `ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`). PyTorch exposes no bf16 flag, only its kernel level
(`torch.backends.cpu.get_cpu_capability()`). Whether oneDNN's convolutions are faster in NHWC
depends on the model and the CPU, so a few training steps of the model are timed in both
layouts, at that precision, and the faster wins. A rule for the precision, not a race: a race run
while other work shares the cores can pick a setting that is slower on the idle machine, and
stays picked.

Each choice is stored in `<cache>/visionflow/fast-settings.json` (`$XDG_CACHE_HOME` or
~/.cache), keyed by CPU, PyTorch's kernel level on it, torch version, threads, model and image
size, so a machine decides once and every later run (a resume, a rerun, a reproduction) gets the
same settings, which also keeps its weights bit-identical. The measurement draws its random numbers
from its own generator: the training's random streams are untouched.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from visionflow.fileio import atomic_write_json, locked, user_cache_dir
from visionflow.models import build_model
from visionflow.train.device import autocast

log = logging.getLogger(__name__)

SETTINGS_FILE = "fast-settings.json"
PROBE_ROUNDS = 7  # timed training steps per candidate, interleaved (after one warm-up step); the fastest counts
PROBE_PIXELS = 64 * 32 * 32  # images x pixels per probe batch: 64 CIFAR images, 1 at 224 px
PROBE_CLASSES = 10  # the classifier layer is a sliver of the work: one probe serves every class count
BF16_SLOWDOWN_WARNING = 1.2  # explicit bf16 this much slower than fp32 on a CPU: warn


@dataclass(frozen=True)
class FastSettings:
    precision: str  # fp32 or bf16
    channels_last: bool
    reason: str  # one line: how it was decided


def cache_file() -> Path:
    """Where the per-machine decisions are stored."""
    return user_cache_dir() / SETTINGS_FILE


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Probe:
    """One candidate setting: a fresh model and a fixed batch, ready to time training steps."""

    def __init__(self, model_name: str, image_size: int, batch: int, precision: str, channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.random.fork_rng(devices=[]):  # the model's initialisation must not move the global RNG
            torch.manual_seed(0)
            self.model = build_model(model_name, PROBE_CLASSES).to(memory_format=fmt)
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(batch, 3, image_size, image_size, generator=generator).to(memory_format=fmt)
        self.labels = torch.randint(0, PROBE_CLASSES, (batch,), generator=generator)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.precision = precision
        self.step()  # warm-up: the first step pays one-time kernel setup

    def step(self) -> float:
        """Seconds of one training step: forward, backward, SGD step."""
        start = time.perf_counter()
        with autocast(torch.device("cpu"), self.precision):
            loss = nn.functional.cross_entropy(self.model(self.inputs), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def _fastest_steps(probes: dict[tuple[str, bool], _Probe]) -> dict[tuple[str, bool], float]:
    """Each probe's fastest step over PROBE_ROUNDS interleaved rounds: on a shared machine the
    minimum is the speed a setting reaches when it has the cores, the same for all candidates."""
    best = {key: float("inf") for key in probes}
    for _ in range(PROBE_ROUNDS):
        for key, probe in probes.items():
            best[key] = min(best[key], probe.step())
    return best


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: x86 AVX512-BF16 or AMX-BF16 in the kernel's CPU
    flags, and PyTorch's AVX512 kernels in use (`ATEN_CPU_CAPABILITY=avx2` caps them, as on a CPU
    without AVX512). Elsewhere bf16 autocast is emulated, ~10x slower than fp32."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _probe_batch(image_size: int) -> int:
    return max(1, PROBE_PIXELS // (image_size * image_size))


def measure_cpu_settings(model_name: str, image_size: int) -> FastSettings:
    """bf16 where native on this CPU, else fp32; the faster memory format for `model_name` at
    `image_size` in that precision, measured."""
    batch = _probe_batch(image_size)
    native = native_bf16()
    precision = "bf16" if native else "fp32"
    seconds = _fastest_steps(
        {(precision, cl): _Probe(model_name, image_size, batch, precision, cl) for cl in (False, True)}
    )
    channels_last = seconds[(precision, True)] < seconds[(precision, False)]
    return FastSettings(
        precision,
        channels_last,
        f"{cpu_name()}: {'native' if native else 'no native'} bf16; {precision} channels_last "
        f"{seconds[(precision, False)] / seconds[(precision, True)]:.2f}x NCHW, measured ({batch} images per step)",
    )


def fast_settings(device: torch.device, model_name: str, image_size: int) -> FastSettings:
    """The settings `auto` means for `model_name` at `image_size` on `device` (CPU: measured once
    per machine)."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return FastSettings("bf16" if bf16 else "fp32", True, f"{name}: bf16 {'supported' if bf16 else 'unsupported'}")
    if device.type != "cpu":
        return FastSettings("fp32", False, f"{device.type}: fp32, NCHW")
    key = (
        f"v3|{cpu_name()}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}"
        f"|threads {torch.get_num_threads()}|{model_name}|{image_size}px"
    )
    path = cache_file()
    with locked(path.with_suffix(".lock")):  # two runs starting at once measure once and agree
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if key not in stored:
            stored[key] = asdict(measure_cpu_settings(model_name, image_size))
            atomic_write_json(path, stored)
            log.info("fast settings for %s: %s", key, stored[key]["reason"])
    return FastSettings(**stored[key])


def bf16_slowdown(model_name: str, image_size: int) -> float:
    """How many times slower a bf16 training step is than an fp32 one on this CPU (measured)."""
    batch = _probe_batch(image_size)
    seconds = _fastest_steps({(p, False): _Probe(model_name, image_size, batch, p, False) for p in ("fp32", "bf16")})
    return seconds[("bf16", False)] / seconds[("fp32", False)]
