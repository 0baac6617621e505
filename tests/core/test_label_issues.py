"""Label issues: cleanlab on out-of-fold probabilities, the folds trained with the run's config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TINY_CLASSES, copy_tiny_dataset, tiny_config
from visionflow.data.splits import resolve_dataset
from visionflow.label_issues import (
    CACHE_SUBDIR,
    GRID_NAME,
    REPORT_NAME,
    find_issues,
    fold_indices,
    rank_label_issues,
    write_issues,
)


def test_folds_are_stratified_disjoint_and_cover_every_image() -> None:
    labels = np.repeat(np.arange(4), 10)
    folds = fold_indices(labels, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(40))
    assert all(np.bincount(labels[held], minlength=4).tolist() == [2, 2, 2, 2] for held in folds)
    assert [f.tolist() for f in fold_indices(labels, 5, seed=0)] == [f.tolist() for f in folds]


def test_a_confidently_contradicted_label_is_ranked_first(tmp_path: Path, sample_dataset: Path) -> None:
    split = resolve_dataset(str(copy_tiny_dataset(sample_dataset, tmp_path / "d", TINY_CLASSES, 8, 2))).train
    labels = np.asarray(split.labels)
    probabilities = np.full((len(labels), 4), 0.02)
    probabilities[np.arange(len(labels)), labels] = 0.94
    probabilities[5] = [0.01, 0.01, 0.01, 0.97]  # given airplane (0), clearly a ship (3)
    report = rank_label_issues(split, probabilities, folds=2)
    first = report.issues[0]
    assert (first.file, first.given, first.suggested) == (split.relpath(5), "airplane", "ship")
    assert first.score == pytest.approx(0.01) and len(report.issues) == 1


@pytest.mark.slow
def test_find_issues_trains_each_fold_once_and_writes_json_and_grid(tmp_path: Path, sample_dataset: Path) -> None:
    root = copy_tiny_dataset(sample_dataset, tmp_path / "data", TINY_CLASSES, 8, 2)
    moved = root / "train" / "ship" / "moved-from-cat.png"
    shutil.copy(sorted((root / "train" / "cat").iterdir())[0], moved)  # a cat filed as a ship
    dataset = resolve_dataset(str(root))
    config = tiny_config(root, tmp_path / "out", **{"label_issues.folds": 2})
    report = find_issues(dataset, config)
    assert report.num_train == len(dataset.train) and report.folds == 2
    assert all(issue.given != issue.suggested or issue.score < 0.5 for issue in report.issues)
    cached = sorted((tmp_path / "out" / CACHE_SUBDIR).glob("*.npz"))
    assert len(cached) == 2
    stamps = [path.stat().st_mtime_ns for path in cached]
    assert find_issues(dataset, config) == report  # from the cache: nothing trained again
    assert [path.stat().st_mtime_ns for path in cached] == stamps
    write_issues(report, dataset.train, tmp_path / "report")
    written = json.loads((tmp_path / "report" / REPORT_NAME).read_text())
    assert written["num_train"] == len(dataset.train) and len(written["issues"]) == len(report.issues)
    with Image.open(tmp_path / "report" / GRID_NAME) as grid:
        assert grid.format == "PNG"
