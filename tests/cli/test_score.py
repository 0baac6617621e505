"""`visionflow score` as users run it: killed with kill -9 halfway (a real process, a real signal),
then rerun, it scores only what is missing and writes the same table (Parquet, the same bytes) as
one uninterrupted run; its summary as JSON; bad options are one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from flows.cli import main
from tests.helpers import REPO, cli_command, wait_for
from visionflow.checkpoints import export_model
from visionflow.scoring import shards_dir
from visionflow.train.records import ModelSpec

SHARD = 8  # rows per shard on average: the 153 photos make about 19 shards


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec("tudui", 2, 32, ["ants", "bees"], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    folder = tmp_path_factory.mktemp("score-model") / "export"
    export_model(spec.build(), spec, folder)
    return folder


@pytest.fixture(scope="module")
def listing(tmp_path_factory, hymenoptera: Path) -> Path:
    """A Parquet listing of the 153 ants/bees photos of val/ (a few hundred pixels a side: decoding takes seconds)."""
    path = tmp_path_factory.mktemp("score-inputs") / "listing.parquet"
    pd.DataFrame({"path": [str(p) for p in sorted((hymenoptera / "val").rglob("*.jpg"))]}).to_parquet(path)
    return path


def score_args(listing: Path, model: Path, table: Path) -> list[str]:
    options = ["--shard-size", str(SHARD), "--batch-size", "8", "--workers", "1", "--device", "cpu", "--json"]
    return ["score", str(listing), "--checkpoint", str(model), "--table", str(table), *options]


@pytest.mark.slow
def test_kill_9_halfway_then_rerun_gives_the_uninterrupted_table(listing, model, tmp_path, capsys):
    table = tmp_path / "killed" / "scores.parquet"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [*cli_command(), *score_args(listing, model, table)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        shards = wait_for(
            lambda: list(shards_dir(table).glob("*.parquet")) if process.poll() is None else None,
            lambda found: found is None or len(found) >= 2,
            timeout=120,
            failure=lambda found: f"no 2 shards written: {found}",
            interval=0.05,
        )
        assert shards is not None, f"scoring ended before it was killed: {process.stderr.read()}"
        os.killpg(process.pid, signal.SIGKILL)  # the command and its DataLoader worker
    finally:
        process.wait(timeout=30)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL and not table.exists()
    done = {shard: pq.ParquetFile(shard).metadata.num_rows for shard in shards_dir(table).glob("*.parquet")}
    images = len(pd.read_parquet(listing))
    assert len(done) >= 2 and sum(done.values()) < images

    assert main(score_args(listing, model, table)) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["images"] == images and resumed["scored"] == images - sum(done.values())
    assert set(done) < set(shards_dir(table).glob("*.parquet"))  # the finished shards were kept
    whole = tmp_path / "whole" / "scores.parquet"
    assert main(score_args(listing, model, whole)) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == images
    assert table.read_bytes() == whole.read_bytes()
    frame = pd.read_parquet(table)
    assert len(frame) == images and (frame["status"] == "ok").all()
    pd.testing.assert_frame_equal(frame, pd.read_parquet(whole))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--table", "scores.txt"], "ending in .parquet or .csv"),
        (["--checkpoint", "champion:nightly"], "is empty"),
        (["--workers", "-1"], "'num_workers'"),
    ],
)
def test_bad_options_are_one_line(listing, model, tmp_path, capsys, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(["score", str(listing), "--checkpoint", str(model), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
