"""Batch scoring (visionflow.scoring) on real JPEGs of cifar10-mini: a folder, a glob, a CSV and a
Parquet listing resolve to the same files; unreadable files are rows with a status, not a crash; a
rerun reuses every shard and writes the same table (Parquet, or CSV with the same rows); a model or
top-k change rescores; a changed or added file rescores only its shard."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import write_image
from visionflow.checkpoints import export_model
from visionflow.errors import CheckpointError, ConfigError, DatasetError, PathError
from visionflow.scoring import (
    OK,
    UNREADABLE,
    ScoreConfig,
    model_path,
    resolve_inputs,
    resolve_model,
    score_images,
    shards_dir,
    table_columns,
)
from visionflow.train.records import ModelSpec

CLASSES = ["airplane", "automobile", "bird", "cat"]


@pytest.fixture(scope="module")
def inbox(tmp_path_factory, cifar_mini: Path) -> Path:
    """24 cifar10-mini JPEGs in two subfolders, a file that is no image and a truncated JPEG."""
    root = tmp_path_factory.mktemp("scoring") / "inbox"
    for index, image in enumerate(sorted((cifar_mini / "val").rglob("*.jpg"))[::40][:24]):
        target = root / f"part{index % 2}" / f"{index:03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    (root / "part0" / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    whole = (root / "part1" / "001.jpg").read_bytes()
    (root / "part1" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    return root


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec("tudui", len(CLASSES), 32, CLASSES, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    folder = tmp_path_factory.mktemp("model") / "export"
    export_model(spec.build(), spec, folder)
    return folder


def score(export: Path, inputs: Path | str, table: Path, **options) -> tuple:
    config = ScoreConfig(inputs=str(inputs), checkpoint=str(export), table=str(table), num_workers=1, **options)
    return score_images(resolve_model(config.checkpoint, config.output_dir), resolve_inputs(config.inputs), config)


def shard_rows(table: Path) -> dict[Path, int]:
    """The table's shard files -> their rows."""
    return {shard: pq.ParquetFile(shard).metadata.num_rows for shard in shards_dir(table).iterdir()}


def test_unreadable_files_are_rows_with_a_status_and_the_batch_goes_on(export, inbox, tmp_path):
    table = tmp_path / "scores.parquet"
    summary = score(export, inbox, table, shard_size=10, batch_size=4, top_k=3)
    frame = pd.read_parquet(table)
    assert list(frame.columns) == table_columns(3) and frame["probability_1"].dtype == np.float64
    assert len(frame) == summary.images == summary.scored == 26
    bad = frame[frame["status"] == UNREADABLE].set_index("path")
    assert set(bad.index) == {str(inbox / "part0" / "corrupt.jpg"), str(inbox / "part1" / "truncated.jpg")}
    assert bad.loc[str(inbox / "part0" / "corrupt.jpg"), "reason"] == "not a recognised image format"
    assert "truncated" in bad.loc[str(inbox / "part1" / "truncated.jpg"), "reason"]
    assert bad["class_1"].isna().all() and bad["probability_1"].isna().all() and summary.unreadable == 2
    good = frame[frame["status"] == OK]
    assert set(good["class_1"]) <= set(CLASSES) and good["reason"].isna().all() and good["sha256"].notna().all()
    probabilities = good[["probability_1", "probability_2", "probability_3"]]
    assert (probabilities.diff(axis=1).iloc[:, 1:] <= 0).all().all()  # most probable first
    assert set(frame["model_version"]) == {resolve_model(str(export), ".").version}
    assert sum(summary.class_counts.values()) == 24
    assert len(summary.lowest) == 16 and summary.lowest[0]["probability"] == probabilities["probability_1"].min()


def test_a_rerun_reuses_every_shard_and_writes_the_same_table(export, inbox, tmp_path):
    first = score(export, inbox, tmp_path / "a.parquet", shard_size=7, batch_size=3)
    again = score(export, inbox, tmp_path / "a.parquet", shard_size=7, batch_size=3)
    assert (first.scored, again.scored) == (26, 0)
    fresh = score(export, inbox, tmp_path / "b.parquet", shard_size=7, batch_size=3)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes() and fresh.scored == 26
    shards = shard_rows(tmp_path / "a.parquet")
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == len(shards) and sum(shards.values()) == 26
    # The CSV table holds the same rows (empty cells where Parquet has nulls).
    as_csv = score(export, inbox, tmp_path / "c.csv", shard_size=7, batch_size=3)
    assert as_csv.scored == 26 and {**as_csv.__dict__, "table": ""} == {**first.__dict__, "table": ""}
    parquet = pd.read_parquet(tmp_path / "a.parquet").fillna(np.nan)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "c.csv"), parquet, check_dtype=False)
    # Another top-k is another table: everything is scored again and the old shards go.
    assert score(export, inbox, tmp_path / "a.parquet", shard_size=7, batch_size=3, top_k=2).scored == 26
    assert len(shard_rows(tmp_path / "a.parquet")) == len(shards) and not set(shards) & set(
        shard_rows(tmp_path / "a.parquet")
    )


def test_a_changed_or_added_file_rescores_only_its_shard(export, inbox, tmp_path):
    inputs, table = tmp_path / "inbox", tmp_path / "s.parquet"
    shutil.copytree(inbox, inputs)
    score(export, inputs, table, shard_size=3)
    before = shard_rows(table)
    assert len(before) > 2  # 26 files, a boundary after 1 in 3 paths
    changes = [  # (a change, the files it adds)
        (lambda: write_image(inputs / "part0" / "000.jpg", size=(32, 32), seed=7, fmt="JPEG"), 0),
        (lambda: shutil.copy(inputs / "part1" / "001.jpg", inputs / "part0" / "000-new.jpg"), 1),
    ]
    for change, added in changes:
        change()
        scored = score(export, inputs, table, shard_size=3).scored
        after = shard_rows(table)
        new = {shard: rows for shard, rows in after.items() if shard not in before}
        gone = [rows for shard, rows in before.items() if shard not in after]
        # The shard the file falls in is scored again (an added file that is itself a boundary splits
        # it in two, or makes a shard of its own); the others are kept.
        assert len(gone) <= 1 and 1 <= len(new) <= 2 and scored == sum(new.values()) == sum(gone) + added
        assert scored < sum(after.values()) and len(after) == len(before) + len(new) - len(gone)
        before = after


def test_folder_glob_and_listing_name_the_same_files(inbox, tmp_path):
    from_folder = resolve_inputs(str(inbox))
    assert len(from_folder) == 26 and all(p.is_absolute() for p in from_folder)
    assert resolve_inputs(f"{inbox}/**/*.jpg") == from_folder
    listing = pd.DataFrame({"path": [str(p.relative_to(inbox.parent)) for p in from_folder]})
    listing.to_csv(inbox.parent / "listing.csv", index=False)
    listing.to_parquet(inbox.parent / "listing.parquet")
    assert resolve_inputs(str(inbox.parent / "listing.csv")) == from_folder
    assert resolve_inputs(str(inbox.parent / "listing.parquet")) == from_folder


def test_bad_inputs_and_models_are_one_line_errors(inbox, tmp_path, export):
    (tmp_path / "empty").mkdir()
    pd.DataFrame({"file": ["a.jpg"]}).to_csv(tmp_path / "no_path.csv", index=False)
    pd.DataFrame({"file": ["a.jpg"]}).to_parquet(tmp_path / "no_path.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    cases = [
        (lambda: resolve_inputs(str(tmp_path / "missing")), PathError, "missing"),
        (lambda: resolve_inputs(str(tmp_path / "empty")), DatasetError, "No image files"),
        (lambda: resolve_inputs(str(tmp_path / "no_path.csv")), DatasetError, "no 'path' column: it has file"),
        (lambda: resolve_inputs(str(tmp_path / "no_path.parquet")), DatasetError, "no 'path' column: it has file"),
        (lambda: resolve_inputs(str(tmp_path / "broken.parquet")), DatasetError, "Cannot read input listing"),
        (lambda: model_path("champion:nightly", tmp_path), CheckpointError, "is empty"),
        (lambda: score(export, inbox, tmp_path / "scores.xlsx"), ConfigError, "ending in .parquet or .csv"),
    ]
    for call, error, fragment in cases:
        with pytest.raises(error, match=fragment) as caught:
            call()
        assert "\n" not in str(caught.value)
