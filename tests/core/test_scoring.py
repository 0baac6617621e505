"""Batch scoring (visionflow.scoring) on real JPEGs of cifar10-mini: a folder, a glob and a CSV
listing resolve to the same files; unreadable files are rows with a status, not a crash; a rerun
reuses every shard and writes the same table; a model or top-k change rescores."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
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


def test_unreadable_files_are_rows_with_a_status_and_the_batch_goes_on(export, inbox, tmp_path):
    table = tmp_path / "scores.csv"
    summary = score(export, inbox, table, shard_size=10, batch_size=4, top_k=3)
    frame = pd.read_csv(table, keep_default_na=False)
    assert list(frame.columns) == table_columns(3)
    assert len(frame) == summary.images == summary.scored == 26
    bad = frame[frame["status"] == UNREADABLE].set_index("path")
    assert set(bad.index) == {str(inbox / "part0" / "corrupt.jpg"), str(inbox / "part1" / "truncated.jpg")}
    assert bad.loc[str(inbox / "part0" / "corrupt.jpg"), "reason"] == "not a recognised image format"
    assert "truncated" in bad.loc[str(inbox / "part1" / "truncated.jpg"), "reason"]
    assert (bad["class_1"] == "").all() and summary.unreadable == 2
    good = frame[frame["status"] == OK]
    assert set(good["class_1"]) <= set(CLASSES) and (good["reason"] == "").all()
    probabilities = good[["probability_1", "probability_2", "probability_3"]].astype(float)
    assert (probabilities.diff(axis=1).iloc[:, 1:] <= 0).all().all()  # most probable first
    assert set(frame["model_version"]) == {resolve_model(str(export), ".").version}
    assert sum(summary.class_counts.values()) == 24
    assert len(summary.lowest) == 16 and summary.lowest[0]["probability"] == probabilities["probability_1"].min()


def test_a_rerun_reuses_every_shard_and_writes_the_same_table(export, inbox, tmp_path):
    first = score(export, inbox, tmp_path / "a.csv", shard_size=7, batch_size=3)
    again = score(export, inbox, tmp_path / "a.csv", shard_size=7, batch_size=3)
    assert (first.scored, again.scored) == (26, 0)
    fresh = score(export, inbox, tmp_path / "b.csv", shard_size=7, batch_size=3)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert len(list(shards_dir(tmp_path / "a.csv").iterdir())) == 4 and fresh.scored == 26
    # Another top-k is another table: everything is scored again and the old shards go.
    assert score(export, inbox, tmp_path / "a.csv", shard_size=7, batch_size=3, top_k=2).scored == 26
    assert len(list(shards_dir(tmp_path / "a.csv").iterdir())) == 4


def test_a_changed_file_rescores_only_its_shard(export, inbox, tmp_path):
    inputs = tmp_path / "inbox"
    shutil.copytree(inbox, inputs)
    score(export, inputs, tmp_path / "s.csv", shard_size=5)
    write_image(inputs / "part0" / "000.jpg", size=(32, 32), seed=7, fmt="JPEG")
    assert score(export, inputs, tmp_path / "s.csv", shard_size=5).scored == 5


def test_folder_glob_and_listing_name_the_same_files(inbox, tmp_path):
    from_folder = resolve_inputs(str(inbox))
    assert len(from_folder) == 26 and all(p.is_absolute() for p in from_folder)
    assert resolve_inputs(f"{inbox}/**/*.jpg") == from_folder
    listing = inbox.parent / "listing.csv"
    pd.DataFrame({"path": [str(p.relative_to(inbox.parent)) for p in from_folder]}).to_csv(listing, index=False)
    assert resolve_inputs(str(listing)) == from_folder


def test_bad_inputs_and_models_are_one_line_errors(inbox, tmp_path, export):
    (tmp_path / "empty").mkdir()
    pd.DataFrame({"file": ["a.jpg"]}).to_csv(tmp_path / "no_path.csv", index=False)
    cases = [
        (lambda: resolve_inputs(str(tmp_path / "missing")), PathError, "missing"),
        (lambda: resolve_inputs(str(tmp_path / "empty")), DatasetError, "No image files"),
        (lambda: resolve_inputs(str(tmp_path / "no_path.csv")), DatasetError, "no 'path' column: it has file"),
        (lambda: model_path("champion:nightly", tmp_path), CheckpointError, "is empty"),
        (lambda: score(export, inbox, tmp_path / "scores.parquet"), ConfigError, "ending in .csv"),
    ]
    for call, error, fragment in cases:
        with pytest.raises(error, match=fragment) as caught:
            call()
        assert "\n" not in str(caught.value)
