"""`visionflow evaluate` and `visionflow predict` on a checkpoint really trained for one epoch on a
small copy of the bundled sample: evaluate --json, predict --json and a malicious checkpoint as
subprocesses (what a user runs), the rest through `main()` in-process (the same handlers and
error printing, without paying an interpreter start each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.cli import main
from visionflow.checkpoints import export_model, load_checkpoint, load_model, save_checkpoint
from visionflow.config import build_config
from visionflow.data.decoded import load_decoded
from visionflow.data.splits import resolve_dataset
from visionflow.train.engine import fit
from visionflow.train.records import ModelSpec

REPO = Path(__file__).resolve().parents[2]
TRAIN_PER_CLASS, VAL_PER_CLASS = 4, 2


def visionflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI (`python -m flows.cli` is what the `visionflow` console script calls)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """`main(args)` with its exit code and captured output, shaped like a subprocess result."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def copy_subset(source: Path, target: Path) -> None:
    """train/ and val/ with the first few images of every class."""
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for folder in sorted((source / split).iterdir()):
            (target / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copy(image, target / split / folder.name / image.name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_dataset):
    """(work dir, dataset folder, best.pt, fit result) after one real epoch of the tutorial's net."""
    work = tmp_path_factory.mktemp("cli")
    dataset = work / "mini"
    copy_subset(sample_dataset, dataset)
    info = resolve_dataset(str(dataset))
    config = build_config(
        {"data": {"dataset": str(dataset), "batch_size": 8}, "training": {"epochs": 1, "device": "cpu"}}
    )
    train, val = (load_decoded(split, 32, work / "cache") for split in (info.train, info.eval_split))
    spec = ModelSpec("tudui", len(info.classes), 32, list(info.classes))
    torch.manual_seed(0)
    result = fit(spec.build(), train, val, config, spec, checkpoint_dir=work / "checkpoints")
    return work, dataset, result.best_checkpoint, result


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_evaluate_json_matches_the_training_run(trained):
    work, dataset, best, result = trained
    proc = visionflow("evaluate", "--checkpoint", best, "--dataset", dataset, "--data-dir", work, "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["num_images"] == 10 * VAL_PER_CLASS
    assert report["accuracy"] == pytest.approx(result.history[-1].eval_accuracy)
    assert report["loss"] == pytest.approx(result.history[-1].eval_loss, rel=1e-4)
    assert [row["class"] for row in report["per_class"]] == report["classes"]
    assert sum(map(sum, report["confusion_matrix"])) == 10 * VAL_PER_CLASS
    assert report["top5"] is not None  # 10 classes
    assert len(report["confidently_wrong"]) <= 16
    assert (work / "cache").is_dir()  # the decoded split is cached under --data-dir


def test_evaluate_streams_with_loader_stream_and_reports_the_same(trained, capsys):
    work, dataset, best, _ = trained
    reports = {}
    for loader in ("memory", "stream"):
        data_dir = work / f"data-{loader}"
        args = ("--dataset", dataset, "--data-dir", data_dir, "--loader", loader, "--json")
        proc = in_process(capsys, "evaluate", "--checkpoint", best, *args)
        assert proc.returncode == 0, proc.stderr
        reports[loader] = json.loads(proc.stdout)
    assert reports["stream"] == reports["memory"]
    assert (work / "data-memory" / "cache").is_dir() and not (
        work / "data-stream"
    ).exists()  # stream decodes nothing to disk


def test_evaluate_text_on_an_export_and_the_train_split(trained, capsys):
    work, dataset, best, _ = trained
    model, spec = load_model(best)
    export_model(model, spec, work / "export")
    proc = in_process(
        capsys,
        "evaluate",
        "--checkpoint",
        work / "export",
        "--dataset",
        dataset,
        "--split",
        "train",
        "--data-dir",
        work,
        "--batch-size",
        "7",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"images: {10 * TRAIN_PER_CLASS}" in proc.stdout and "split: train" in proc.stdout
    assert "precision" in proc.stdout and "true \\ predicted" in proc.stdout and "airplane" in proc.stdout


def test_predict_json_lists_every_image_in_order(trained):
    work, dataset, best, _ = trained
    images = [dataset / "val" / "cat" / name for name in sorted(os.listdir(dataset / "val" / "cat"))]
    proc = visionflow("predict", "--checkpoint", best, *images, "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)
    classes = load_checkpoint(best)["spec"]["class_names"]
    assert [p["image"] for p in predictions] == [str(i) for i in images]
    assert all(p["label"] in classes and 0 < p["probability"] <= 1 for p in predictions)


def test_predict_text_is_one_line_per_image(trained, capsys):
    work, dataset, best, _ = trained
    images = sorted((dataset / "val" / "cat").iterdir())
    predictions = json.loads(
        in_process(capsys, "predict", "--checkpoint", best, *images, "--json", "--device", "cpu").stdout
    )
    text = in_process(capsys, "predict", "--checkpoint", best, images[0])
    assert text.returncode == 0 and text.stdout.splitlines() == [
        f"{images[0]}\t{predictions[0]['label']}\t{predictions[0]['probability']:.4f}"
    ]


def test_bad_checkpoints_fail_with_one_line_and_nothing_runs(trained, capsys):
    work, dataset, best, _ = trained
    marker = work / "PWNED"
    evil = work / "evil.pt"
    torch.save({"model": Payload(marker)}, evil)
    corrupt = work / "corrupt.pt"
    corrupt.write_bytes(best.read_bytes()[:1000])
    wrong = save_checkpoint(
        work / "wrong.pt",
        load_checkpoint(best)
        | {"spec": ModelSpec("resnet18_cifar", 10, 32, load_checkpoint(best)["spec"]["class_names"]).to_dict()},
    )
    image = next((dataset / "val" / "cat").iterdir())
    cases = [
        (work / "missing.pt", "not found"),
        (corrupt, "refused by the safe"),
        (evil, "posix.system"),
        (wrong, "missing keys"),
    ]
    for checkpoint, fragment in cases:
        assert_one_line_error(
            in_process(capsys, "predict", "--checkpoint", checkpoint, image), str(checkpoint), fragment
        )
    # A real process too: exit status, nothing on stderr but the one line, the payload never ran.
    assert_one_line_error(visionflow("evaluate", "--checkpoint", evil, "--dataset", dataset, cwd=work), "posix.system")
    assert not marker.exists()


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_class_mismatch_and_unreadable_image_fail_with_one_line(trained, capsys):
    work, dataset, best, _ = trained
    other = work / "other"
    for split in ("train", "val"):
        shutil.copytree(dataset / split / "cat", other / split / "kitten")
        shutil.copytree(dataset / split / "dog", other / split / "puppy")
    proc = in_process(capsys, "evaluate", "--checkpoint", best, "--dataset", other, "--data-dir", work)
    assert_one_line_error(proc, "['kitten', 'puppy'] do not match the model's class_names")
    proc = in_process(capsys, "evaluate", "--checkpoint", best, "--dataset", dataset, "--split", "test")
    assert_one_line_error(proc, "has no 'test' split: it has train, val")
    broken = work / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    assert_one_line_error(in_process(capsys, "predict", "--checkpoint", best, broken), "broken.jpg")
