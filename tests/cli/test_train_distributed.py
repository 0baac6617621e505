"""`visionflow train --nproc-per-node`: bad distributed settings are one-line errors before anything
is written (the runs themselves: tests/flows/test_train_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--nproc-per-node", "3"], "'data.batch_size': 64 does not divide by the world size 3"),
        (["--nproc-per-node", "2", "--batch-size", "9"], "'data.batch_size': 9 does not divide by the world size 2"),
        (["--nproc-per-node", "0"], "Invalid config field 'training.distributed.nproc_per_node'"),
        (["--nproc-per-node", "two"], "Invalid config field 'training.distributed.nproc_per_node'"),
        (["--nnodes", "2"], "nnodes 2 needs rdzv_endpoint"),
        (["--rdzv-endpoint", "node0"], "Invalid config field 'training.distributed.rdzv_endpoint'"),
    ],
)
def test_bad_distributed_setting_is_one_line_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], expected: str
) -> None:
    code = main(["train", "--device", "cpu", "--output", str(tmp_path / "out"), *flags])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
