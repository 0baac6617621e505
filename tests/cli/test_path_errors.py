"""Every command given a path that cannot be created or read (one under a regular file) ends in one
line on stderr naming that path and exit status 2, no traceback, nothing written; run as real
subprocesses, the way users run them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
BLOCKED = "FILE/sub"  # FILE is a regular file: nothing can be created or read under it

# One case per command and path argument: (command line, the path the error must name).
CASES = {
    "validate --dataset": (["validate", "--dataset", BLOCKED], BLOCKED),
    "validate --data-dir": (["validate", "--dataset", "sample", "--data-dir", BLOCKED], BLOCKED),
    "evaluate --checkpoint": (["evaluate", "--checkpoint", BLOCKED, "--dataset", "sample"], BLOCKED),
    "evaluate --data-dir": (
        ["evaluate", "--checkpoint", "model.pt", "--dataset", "sample", "--data-dir", BLOCKED],
        BLOCKED,
    ),
    "predict --checkpoint": (["predict", "--checkpoint", BLOCKED, "image.png"], BLOCKED),
    "train --output": (["train", "--dataset", "sample", "--output", BLOCKED], BLOCKED),
    "train --output FILE": (["train", "--dataset", "sample", "--output", "FILE"], "FILE"),
    "train --config": (["train", "--config", BLOCKED], BLOCKED),
    "train data.data_dir": (["train", "--config", "blocked-data.yaml"], BLOCKED),
    "sweep --space": (["sweep", "--space", BLOCKED], BLOCKED),
    "sweep --output": (["sweep", "--space", "space.yaml", "--output", BLOCKED], BLOCKED),
    "runs --output": (["runs", "--output", BLOCKED], BLOCKED),
    "diff --output": (["diff", "a", "b", "--output", BLOCKED], BLOCKED),
    "diff RUN_A": (["diff", f"{BLOCKED}/a", f"{BLOCKED}/b"], BLOCKED),
    "gc --output": (["gc", "--output", BLOCKED], BLOCKED),
    "reproduce RUN_DIR": (["reproduce", BLOCKED], BLOCKED),
    "score INPUTS": (["score", BLOCKED], BLOCKED),
    "export --checkpoint": (["export", "--checkpoint", BLOCKED, "--format", "onnx", "--out", "out"], BLOCKED),
    "alerts apply --file": (["alerts", "apply", "--webhook-url", "http://127.0.0.1:9/", "--file", BLOCKED], BLOCKED),
}
NO_PATH_ARGUMENT = {"server"}  # its only argument is a port


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The working directory: FILE (a regular file), a valid sweep space, a config whose data
    directory is under FILE; homes and caches beside it, not in it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "FILE").write_text("a regular file\n")
    (work / "space.yaml").write_text("optim.lr: [0.001, 0.003]\n")
    (work / "blocked-data.yaml").write_text(f"data:\n  data_dir: {BLOCKED}\n")
    return work


def visionflow(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI as a subprocess, with its own cache and Prefect home and no outside Prefect API."""
    homes = cwd.parent
    env = {
        **{name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"},
        "PYTHONPATH": str(REPO),
        "XDG_CACHE_HOME": str(homes / "cache"),
        "PREFECT_HOME": str(homes / "prefect"),
    }
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with a file's bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def assert_one_line_naming(result: subprocess.CompletedProcess[str], path: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert path in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES)
def test_a_path_under_a_file_is_one_line_and_exit_2(case: str, work: Path) -> None:
    args, path = CASES[case]
    before = tree(work)
    result = visionflow(args, work)
    assert_one_line_naming(result, path)
    assert result.stdout == ""
    assert tree(work) == before  # nothing half-written


def test_an_output_the_system_refuses_is_one_line_before_the_flow(work: Path) -> None:
    """/proc refuses a new folder (ENOENT) even to root, whom permission bits would not stop."""
    if not Path("/proc/self").is_dir():
        pytest.skip("no procfs")
    result = visionflow(["train", "--dataset", "sample", "--output", "/proc/visionflow-out"], work)
    assert_one_line_naming(result, "/proc/visionflow-out")


def test_every_command_with_a_path_argument_has_a_case() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    covered = {case.split()[0] for case in CASES}
    assert set(commands) - NO_PATH_ARGUMENT == covered
