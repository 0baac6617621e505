"""`training.precision: auto` and `training.channels_last: auto` on this machine's CPU: decided
once (measured, stored per machine), recorded in the result and the checkpoint, without moving
the training's random streams; an explicit bf16 on a CPU that emulates it is warned about."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import engine_config as _config
from tests.helpers import engine_fit as _fit
from visionflow import checkpoints
from visionflow.train import autotune

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def settings_file(tmp_path, monkeypatch) -> object:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "visionflow" / autotune.SETTINGS_FILE


def test_cpu_settings_are_measured_once_and_stored(settings_file) -> None:
    chosen = autotune.fast_settings(torch.device("cpu"), "tudui", 32)
    assert chosen.precision == ("bf16" if autotune.native_bf16() else "fp32")  # by the CPU flags
    assert isinstance(chosen.channels_last, bool) and autotune.cpu_name() in chosen.reason
    [(key, stored)] = json.loads(settings_file.read_text()).items()
    assert key.endswith("|tudui|32px") and f"threads {torch.get_num_threads()}" in key
    assert stored == {"precision": chosen.precision, "channels_last": chosen.channels_last, "reason": chosen.reason}
    before = settings_file.stat().st_mtime_ns
    assert autotune.fast_settings(torch.device("cpu"), "tudui", 32) == chosen  # read back, not measured again
    assert settings_file.stat().st_mtime_ns == before


def test_auto_is_resolved_recorded_and_leaves_the_random_streams_alone(settings_file, tmp_path) -> None:
    config = _config(epochs=1)
    assert (config.training.precision, config.training.channels_last) == ("auto", "auto")  # the defaults
    cold = _fit(config, checkpoint_dir=tmp_path / "cold")  # measures first
    warm = _fit(config, checkpoint_dir=tmp_path / "warm")  # reads the stored decision
    chosen = autotune.fast_settings(torch.device("cpu"), "tudui", 32)
    assert (cold.precision, cold.channels_last) == (chosen.precision, chosen.channels_last)
    assert cold.weights_sha256 == warm.weights_sha256
    stored = checkpoints.load_checkpoint(tmp_path / "cold" / "last.pt")["config"]["training"]
    assert (stored["precision"], stored["channels_last"]) == (chosen.precision, chosen.channels_last)
    explicit = _fit(_config(epochs=1, training={"precision": chosen.precision, "channels_last": chosen.channels_last}))
    assert explicit.weights_sha256 == cold.weights_sha256  # auto is exactly the setting it chose


def test_explicit_bf16_on_a_cpu_without_native_bf16_is_warned_about(settings_file, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="visionflow.train.engine"):
        result = _fit(_config(epochs=1, training={"precision": "bf16", "channels_last": False}))
    assert result.precision == "bf16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if autotune.native_bf16():
        assert warnings == []
    else:
        assert len(warnings) == 1 and "slower than fp32 on this CPU" in warnings[0]


CAPPED_CPU_SCRIPT = """
import torch
from visionflow.train import autotune
from visionflow.train import engine
from visionflow.config import build_config
from visionflow.train.records import ModelSpec
spec = ModelSpec("tudui", 10, 32, [str(label) for label in range(10)])
chosen = engine.with_fast_settings(build_config({}), spec, torch.device("cpu")).training
print(torch.backends.cpu.get_cpu_capability(), autotune.native_bf16(), chosen.precision)
"""


def test_a_cpu_without_avx512_kernels_gets_fp32(tmp_path) -> None:
    # PyTorch's and oneDNN's kernels capped at AVX2, as on a CPU without AVX512 (AMD Zen 3): bf16
    # is emulated there whatever the CPU flags say (~10x slower than fp32), so auto picks fp32.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", CAPPED_CPU_SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["AVX2 False fp32"]
    [key] = json.loads((tmp_path / "visionflow" / autotune.SETTINGS_FILE).read_text())
    assert "|AVX2|" in key  # a capped run does not reuse the uncapped decision, nor the reverse
