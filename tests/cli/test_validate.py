"""`visionflow validate` run as a real subprocess, the way users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers import run_visionflow as run


def counts(report: dict) -> dict[str, dict[str, int]]:
    return {name: split["classes"] for name, split in report["splits"].items()}


def test_json_report_on_hymenoptera(hymenoptera, tmp_path):
    result = run("validate", "--dataset", str(hymenoptera), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert counts(report) == {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
    assert report["splits"]["train"]["images"] == 245 and report["splits"]["val"]["images"] == 153
    assert len(report["fingerprint"]) == 64 and report["invalid"] == []
    assert set(report["duplicates"]) == {"within_split", "across_splits"}


def test_json_report_on_cifar_mini(cifar_mini, tmp_path):
    result = run("validate", "--dataset", str(cifar_mini), "--json", "--on-invalid", "fail", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert counts(report) == {"train": dict.fromkeys(classes, 500), "val": dict.fromkeys(classes, 100)}
    assert report["splits"]["train"]["sizes"] == {"32x32": 5000}


@pytest.fixture
def small_broken(tmp_path) -> Path:
    """Two classes of tiny PNGs, a zero-byte file and a training image leaked into val."""
    from PIL import Image

    root = tmp_path / "ds"
    for split in ("train", "val"):
        for label, shade in (("a", 10), ("b", 200)):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (4, 4), (shade, i, 0 if split == "train" else 99)).save(
                    root / split / label / f"{i}.png"
                )
    (root / "train" / "b" / "broken.jpg").write_bytes(b"")
    Image.new("RGB", (4, 4), (10, 0, 0)).save(root / "val" / "a" / "leak.png")
    return root


def test_skip_reports_invalid_and_leak_and_exits_zero(small_broken, tmp_path):
    result = run("validate", "--dataset", str(small_broken), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["invalid"] == [{"path": "train/b/broken.jpg", "reason": "empty file"}]
    assert report["duplicates"]["across_splits"] == [["train/a/0.png", "val/a/leak.png"]]


def test_fail_policy_names_the_file(small_broken, tmp_path):
    result = run("validate", "--dataset", str(small_broken), "--on-invalid", "fail", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: Invalid image 'train/b/broken.jpg'")
    assert result.stderr.count("\n") == 1


def test_bad_input_process_prints_one_line_without_traceback(tmp_path):
    result = run("validate", "--dataset", "imagenet-21k", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: Unknown dataset 'imagenet-21k'")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# In-process from here: main() is exactly what the console script calls, and each extra
# subprocess costs a full torch import (seconds on a busy 2-core machine).


def test_human_summary(small_broken, capsys):
    from flows.cli import main

    assert main(["validate", "--dataset", str(small_broken)]) == 0
    out = capsys.readouterr().out
    assert "train: 4 images" in out and "train/b/broken.jpg: empty file" in out
    assert "train/a/0.png = val/a/leak.png" in out


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("missing", "Unknown dataset 'missing'"),
        ("empty", "is empty"),
        ("flat", "has no class subfolders"),
        ("cifar100", "Unknown dataset 'cifar100'"),
    ],
)
def test_bad_inputs_give_one_error_line(tmp_path, capsys, monkeypatch, spec, expected):
    from flows.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # the specs above are relative paths
    assert main(["validate", "--dataset", spec]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and expected in captured.err
    assert captured.err.count("\n") == 1


def test_usage_errors_exit_2(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as info:
        main(["validate", "--dataset", "sample", "--on-invalid", "maybe"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_cli_module_does_not_import_prefect():
    code = "import sys, flows.cli; sys.exit('prefect' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_sample_json_in_process(tmp_path, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.chdir(tmp_path)  # no data/ here: the bundled sample is used
    assert main(["validate", "--dataset", "sample", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"] == "sample" and report["splits"]["train"]["images"] > 0


@pytest.fixture
def leaked_copy(cifar_mini, tmp_path) -> Path:
    """cat photos of cifar10-mini: 12 in train, 5 others in val plus a JPEG-30, mirrored copy of
    train/cat/0004.jpg (val/cat/copy.jpg)."""
    from PIL import Image, ImageOps

    root = tmp_path / "leaky"
    for split, names in (("train", range(0, 12)), ("val", range(500, 505))):
        (root / split / "cat").mkdir(parents=True)
        for k in names:
            source = cifar_mini / split / "cat" / f"{k:04d}.jpg"
            (root / split / "cat" / source.name).write_bytes(source.read_bytes())
    with Image.open(root / "train" / "cat" / "0004.jpg") as image:
        ImageOps.mirror(image.convert("RGB")).save(root / "val" / "cat" / "copy.jpg", quality=30)
    return root


def test_near_duplicates_json_contract(leaked_copy, capsys):
    from flows.cli import main

    assert main(["validate", "--dataset", str(leaked_copy), "--near-duplicates", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    near = report["near_duplicates"]
    assert set(near) == {"within_split", "across_splits"} and near["within_split"] == []
    [pair] = near["across_splits"]
    assert set(pair) == {"train", "eval", "score"}
    assert (pair["train"], pair["eval"]) == ("train/cat/0004.jpg", "val/cat/copy.jpg")  # as "duplicates" writes paths
    assert 0.9 <= pair["score"] <= 1.0
    assert report["near_duplicate_summary"]["eval_leakage_rate"] == pytest.approx(1 / 6)


def test_near_duplicates_on_leak_fail_is_one_error_line(leaked_copy):
    result = run("validate", "--dataset", str(leaked_copy), "--near-duplicates", "--on-leak", "fail", cwd=leaked_copy)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: 1 of 6 val images") and "val/cat/copy.jpg" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_near_duplicate_options_need_the_flag(leaked_copy, capsys):
    from flows.cli import main

    assert main(["validate", "--dataset", str(leaked_copy), "--threshold", "0.95"]) == 2
    assert capsys.readouterr().err == "error: --threshold needs --near-duplicates\n"
    assert main(["validate", "--dataset", str(leaked_copy), "--near-duplicates", "--threshold", "1.5"]) == 2
    assert "threshold 1.5" in capsys.readouterr().err
