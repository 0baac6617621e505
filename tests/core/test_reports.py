"""Run summary markdown, CSV tables and the PIL figures, built from the real report objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from visionflow.config import build_config
from visionflow.data.splits import resolve_dataset
from visionflow.data.validate import validate_dataset
from visionflow.evaluation import report_from_logits
from visionflow.manifest import DataRecord, Manifest, MetricsRecord, ModelRecord, TimingRecord
from visionflow.reports import (
    render_confusion_matrix,
    render_misclassified,
    run_summary_markdown,
    validation_markdown,
    write_csv,
    write_evaluation_csvs,
    write_png,
    write_validation_csvs,
)
from visionflow.runs import RunLayout
from visionflow.tables import Table, markdown_table

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture
def evaluation(folder_dataset: Path) -> dict:
    """EvalReport.to_dict() of 6 val images, two of them confidently wrong."""
    files = [f"{name}/{i}.png" for name in ("cat", "dog") for i in range(2)] + ["cat/0.png", "dog/1.png"]
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    logits = torch.tensor([[3.0, 0, 0], [2, 1, 0], [0, 3, 0], [0, 2, 1], [0, 0, 4], [5, 0, 0]])  # (6, 3)
    return report_from_logits(logits, labels, CLASSES, files).to_dict()


def test_evaluation_csvs_round_trip(tmp_path: Path, evaluation: dict) -> None:
    paths = write_evaluation_csvs(evaluation, tmp_path / "out")
    per_class = pd.read_csv(paths["per_class_metrics"])
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support"]
    assert per_class["class"].tolist() == CLASSES
    assert per_class["support"].tolist() == [3, 3, 0]
    confusion = pd.read_csv(paths["confusion_matrix"])
    assert list(confusion.columns) == ["true", *CLASSES]
    assert confusion[CLASSES].to_numpy().tolist() == evaluation["confusion_matrix"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["confusion_matrix.csv", "per_class_metrics.csv"]


def test_write_csv_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    write_csv(Table(("a",), ((1,),)), path)
    write_csv(Table(("a", "b"), ((2, None), (3, 0.5))), path)
    assert path.read_text() == "a,b\n2,\n3,0.5\n"  # an empty cell for None, as pandas writes NaN
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


def test_validation_tables_and_markdown(tmp_path: Path, folder_dataset: Path) -> None:
    (folder_dataset / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    duplicate = folder_dataset / "val" / "dog" / "copy.png"
    duplicate.write_bytes((folder_dataset / "train" / "dog" / "0.png").read_bytes())  # train/eval leakage
    report, _ = validate_dataset(resolve_dataset(str(folder_dataset), download=False))
    validation = report.to_dict()

    paths = write_validation_csvs(validation, tmp_path)
    counts = pd.read_csv(paths["validation_counts"])
    assert counts.to_dict(orient="list") == {"class": ["cat", "dog"], "train": [4, 4], "val": [2, 3], "total": [6, 7]}
    issues = pd.read_csv(paths["validation_issues"])
    assert sorted(issues["issue"]) == ["train/eval leakage", "unreadable"]
    assert "cat/broken.png" in issues["path"].iloc[0]

    markdown = validation_markdown(validation)
    assert validation["fingerprint"] in markdown
    assert "| cat | 4 | 2 | 6 |" in markdown
    assert "unreadable: 1" in markdown and "train/eval leakage: 1" in markdown


def test_markdown_table_escapes_pipes() -> None:
    table = markdown_table(Table.of(("name", "value"), [{"name": "a|b", "value": 0.5}]))
    assert table.splitlines() == ["| name | value |", "|---|---|", "| a\\|b | 0.5000 |"]


def test_run_summary(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "artifacts" / "runs" / "demo")
    layout.tensorboard.mkdir(parents=True)
    layout.checkpoints.mkdir()
    layout.last_checkpoint.write_bytes(b"x")
    config = build_config({"data": {"dataset": "sample"}, "training": {"epochs": 3, "seed": 7}}).resolved()
    manifest = Manifest.start("demo", config, "2026-01-01T00:00:00+00:00", "abc").finish(
        "completed",
        weights_sha256="e" * 64,
        device="cpu",
        data=DataRecord(
            spec="sample",
            root="/data/sample",
            fingerprint="f" * 64,
            validated_fingerprint="f" * 64,
            num_train=12,
            num_eval=12,
            eval_split="val",
            classes=[str(i) for i in range(12)],
            excluded=[],
        ),
        model=ModelRecord(name="tudui", num_parameters=56714, trainable_parameters=56714),
        metrics=MetricsRecord(
            eval_accuracy=0.6123, eval_loss=1.02, eval_top5=None, best_epoch=3, epochs_trained=3, per_class=[]
        ),
        timing=TimingRecord(
            train_seconds=12.25,
            total_seconds=20.0,
            seconds_per_epoch={"data": 0.5, "forward": 1.5, "backward": 2.0, "callbacks": 0.0},
            other_seconds=8.0,
        ),
    )

    markdown = run_summary_markdown(manifest, layout.root)
    assert markdown.startswith("# Run `demo`: completed")
    assert "Model **tudui** on **sample**, 3 epochs, seed 7, device cpu: eval accuracy **61.23%**." in markdown
    assert "## Model\n\n| field | value |\n|---|---|\n| name | tudui |\n| num_parameters | 56,714 |" in markdown
    assert "| train_seconds | 12.2 s |" in markdown
    assert "| other_seconds | 8.0 s |" in markdown and "seconds_per_epoch" not in markdown
    assert (
        "## Where an epoch's time goes\n\n| phase | per epoch | share |\n|---|---|---|\n| data | 0.500 s | 12% |"
        in markdown
    )
    assert "| backward | 2.000 s | 50% |\n| callbacks | 0.000 s | 0% |" in markdown
    assert "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... (12 in all)" in markdown
    assert f"tensorboard --logdir {layout.tensorboard}\n" in markdown
    assert f"tensorboard --logdir {tmp_path / 'artifacts' / 'runs'}\n" in markdown
    assert f"| last checkpoint | `{layout.last_checkpoint}` |" in markdown
    assert "best checkpoint" not in markdown  # only outputs that exist are listed
    assert "e" * 64 in markdown


def test_confusion_matrix_figure() -> None:
    image = render_confusion_matrix(torch.tensor([[9, 1, 0], [0, 10, 0], [5, 0, 5]]), CLASSES)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    # The figure is mostly white with dark diagonal cells: (9/10, 10/10, 5/10 of each row).
    assert pixels.min() < 80 and (pixels == 255).mean() > 0.3
    with pytest.raises(ValueError, match=r"\(2, 2\).*expected \(3, 3\)"):
        render_confusion_matrix(np.zeros((2, 2)), CLASSES)


def test_misclassified_grid(tmp_path: Path, evaluation: dict, folder_dataset: Path) -> None:
    wrong = evaluation["confidently_wrong"]
    assert [w["file"] for w in wrong] == ["dog/1.png", "cat/0.png"]
    image = render_misclassified(wrong, folder_dataset / "val", tile=64, columns=4)
    assert image.size == (2 * 72, 64 + 2 * 16 + 4 + 8)
    path = write_png(image, tmp_path / "misclassified.png")
    with Image.open(path) as stored:
        assert stored.size == image.size
    empty = render_misclassified([], tile=64, columns=4)
    assert empty.width == 4 * 64
