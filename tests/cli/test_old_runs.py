"""A run written before the core sub-package move (tests/fixtures/written_by_0.1) still reproduces:
`visionflow reproduce` reads its manifest, retrains it with today's code and compares the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO, run_visionflow

OLD_RUN = REPO / "tests" / "fixtures" / "written_by_0.1" / "runs" / "done"


def cpu_like_the_writers() -> bool:
    """The fixture was trained in bf16 on an AMD Zen 4 (AVX512-BF16, no AMX): other CPUs run other
    bf16 kernels, whose roundings may give other weights."""
    flags = Path("/proc/cpuinfo").read_text().split()
    return "avx512_bf16" in flags and "amx_bf16" not in flags


@pytest.mark.server
@pytest.mark.slow
def test_a_run_written_before_the_move_reproduces(tmp_path: Path) -> None:
    shutil.copytree(OLD_RUN, tmp_path / "out" / "runs" / "done")
    result = run_visionflow("reproduce", "out/runs/done", "--json", cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: the weights differ
    comparison = json.loads(result.stdout[result.stdout.index("{") :])
    original = json.loads((OLD_RUN / "manifest.json").read_text())
    assert comparison["original_run"] == "done"
    assert comparison["original_weights_sha256"] == original["weights_sha256"]
    reproduced = json.loads((Path(comparison["reproduced_run_dir"]) / "manifest.json").read_text())
    assert reproduced["status"] == "completed" and reproduced["config"]["training"]["epochs"] == 1
    if cpu_like_the_writers():
        assert comparison["identical"] and result.returncode == 0
        assert comparison["metrics"]["reproduced"] == comparison["metrics"]["original"]


def test_an_export_written_before_the_move_predicts(tmp_path: Path) -> None:
    image = REPO / "data" / "sample" / "val" / "cat" / "0500.jpg"
    result = run_visionflow("predict", "--checkpoint", str(OLD_RUN / "export"), str(image), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (prediction,) = json.loads(result.stdout)
    classes = json.loads((OLD_RUN / "manifest.json").read_text())["data"]["classes"]
    assert list(prediction["probabilities"]) == classes
    assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction["label"] == max(prediction["probabilities"], key=prediction["probabilities"].get)
