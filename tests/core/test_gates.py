"""Promotion gates on prediction arrays (visionflow.gates), and the gated challenge on real exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest

from visionflow import champion as ch
from visionflow.checkpoints import export_model
from visionflow.config import DataConfig, GatesConfig, PipelineConfig
from visionflow.data.splits import DatasetInfo, resolve_dataset
from visionflow.gates import ECE_BINS, Predictions, expected_calibration_error, gate_checks, reliability_diagram
from visionflow.manifest import Manifest, MetricsRecord
from visionflow.models import build_model
from visionflow.train.records import ModelSpec

CLASSES = ("cat", "dog", "ship")
N = 300  # eval images: 100 per class
LABELS = np.arange(N) % 3


def predictions(correct: np.ndarray, confidence: float = 0.8) -> Predictions:
    """Probabilities that put `confidence` on the label where `correct`, else on the next class."""
    predicted = np.where(correct, LABELS, (LABELS + 1) % 3)
    probabilities = np.full((N, 3), (1 - confidence) / 2)
    probabilities[np.arange(N), predicted] = confidence
    return Predictions.of(probabilities, LABELS)


def right_on(indices: np.ndarray | range) -> np.ndarray:
    correct = np.zeros(N, dtype=bool)
    correct[np.asarray(indices)] = True
    return correct


def checks_by_name(challenger: Predictions, champion: Predictions, **gates) -> dict:
    checks = gate_checks(challenger, champion, CLASSES, "eval_accuracy", GatesConfig(**gates))
    assert [c.check for c in checks] == ["gain", "significance", "class recall", "class F1", "calibration"]
    return {check.check: check for check in checks}


def test_a_win_within_noise_is_not_significant() -> None:
    champion = right_on(range(0, 210))  # 70%
    challenger = champion.copy()
    challenger[210:216] = True  # 6 more right, two of each class
    challenger[[1, 2, 3, 4]] = False  # 4 fewer: +2 net, 0.67 points
    checks = checks_by_name(predictions(challenger), predictions(champion))
    assert checks["gain"].passed and checks["gain"].figure == pytest.approx(2 / N)
    significance = checks["significance"]
    assert not significance.passed and significance.threshold == 0.05
    assert significance.figure == pytest.approx(binomtest(6, 10, 0.5, alternative="greater").pvalue)
    assert "challenger alone right on 6, champion alone on 4 of 300 eval images" in significance.detail


def test_a_class_whose_recall_drops_past_the_bound_fails_with_its_name() -> None:
    champion = right_on(range(0, 150))  # 50%, every class 50%
    challenger = right_on(range(0, 240))  # 80% overall
    challenger[LABELS == 2] = right_on(range(0, 120))[LABELS == 2]  # ship: 40 of 100, was 50
    checks = checks_by_name(predictions(challenger), predictions(champion))
    assert checks["significance"].passed and checks["gain"].passed
    recall = checks["class recall"]
    assert not recall.passed and recall.figure == pytest.approx(0.1) and recall.threshold == 0.05
    assert recall.detail == "ship: 0.5000 -> 0.4000"
    assert recall.failure() == "class recall 0.1 is not <= 0.05 (ship: 0.5000 -> 0.4000)"


def test_a_clear_win_passes_every_check() -> None:
    champion = right_on(range(0, 150))
    challenger = right_on(range(0, 240))
    checks = checks_by_name(predictions(challenger), predictions(champion))
    assert all(c.passed for c in checks.values()), [c.failure() for c in checks.values() if not c.passed]
    assert checks["significance"].figure < 1e-6
    assert checks["class recall"].figure < 0 and checks["gain"].figure == pytest.approx(0.3)


def test_a_minimum_gain_and_a_calibration_bound() -> None:
    champion, challenger = predictions(right_on(range(150))), predictions(right_on(range(240)), confidence=0.99)
    checks = checks_by_name(challenger, champion, min_gain=0.5, max_ece_rise=0.0)
    assert not checks["gain"].passed and checks["gain"].threshold == 0.5
    # ECE: champion |0.8 - 0.5| = 0.3, challenger |0.99 - 0.8| = 0.19: better calibrated, passes at 0.
    assert checks["calibration"].passed and checks["calibration"].figure == pytest.approx(0.19 - 0.3, abs=1e-5)
    assert expected_calibration_error(champion) == pytest.approx(0.3, abs=1e-5)  # torchmetrics: float32


def test_leak_free_checks_leave_out_the_leaked_images() -> None:
    champion = right_on(range(150))
    challenger = right_on(range(150))
    challenger[150:180] = True  # its whole gain is on 30 leaked images it memorised
    leaked = np.zeros(N, dtype=bool)
    leaked[150:180] = True
    both = predictions(challenger), predictions(champion)
    gates = GatesConfig()
    with_leaks = gate_checks(*both, CLASSES, "eval_accuracy", gates)
    assert with_leaks[1].passed  # significant when the leaked images count
    leak_free = gate_checks(*both, CLASSES, "eval_accuracy", gates, leaked)
    assert leak_free[0].check == "leak-free gain" and leak_free[0].figure == 0.0
    assert (
        not leak_free[1].passed
        and "270 leak-free eval images (30 with a near-duplicate left out)" in leak_free[1].detail
    )
    ignored = gate_checks(*both, CLASSES, "eval_accuracy", GatesConfig(leak_free=False), leaked)
    assert ignored[0].check == "gain" and ignored[1].passed


def test_loss_is_gained_downwards() -> None:
    champion, challenger = predictions(right_on(range(150))), predictions(right_on(range(240)))
    gain = gate_checks(challenger, champion, CLASSES, "eval_loss", GatesConfig())[0]
    assert gain.passed and gain.figure > 0 and gain.detail.startswith("eval_loss ")


def test_reliability_diagram_is_a_png(tmp_path: Path) -> None:
    path = reliability_diagram(predictions(right_on(range(240))), predictions(right_on(range(150))), tmp_path / "r.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 320)
    assert ECE_BINS == 15


# --- The gated challenge on real exports --------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, sample_dataset: Path) -> DatasetInfo:
    root = tmp_path_factory.mktemp("tiny")
    for split, count in (("train", 2), ("val", 4)):
        for name in ("airplane", "cat", "ship"):
            (root / split / name).mkdir(parents=True)
            for src in sorted((sample_dataset / split / name).iterdir())[:count]:
                shutil.copy(src, root / split / name / src.name)
    return resolve_dataset(str(root))


def make_run(out: Path, name: str, seed: int) -> Path:
    torch.manual_seed(seed)
    classes = ["airplane", "cat", "ship"]
    spec = ModelSpec("tudui", 3, 32, classes, [0.5] * 3, [0.25] * 3)
    run_dir = out / "runs" / name
    export_model(build_model("tudui", 3), spec, run_dir / "export")
    record = MetricsRecord(
        eval_accuracy=1.0, eval_loss=0.0, eval_top5=None, best_epoch=1, epochs_trained=1, per_class=[]
    )
    Manifest.start(name, PipelineConfig(), "2026-01-01T00:00:00+00:00", None).finish("completed", metrics=record).save(
        run_dir
    )
    return run_dir


def test_a_gated_challenge_keeps_the_champion_and_records_every_check(tmp_path: Path, dataset: DatasetInfo) -> None:
    def challenge(run: Path, **gates) -> ch.ChampionDecision:
        data = DataConfig(data_dir=str(tmp_path))
        gated = GatesConfig(**gates)
        return ch.challenge(run, "nightly", "eval_accuracy", dataset.eval_split, tmp_path, data, "cpu", gated)

    assert challenge(make_run(tmp_path, "run-a", seed=0)).reason == "no champion in the slot yet"
    # Untrained nets on 12 images: whatever the manifest claims, nothing is significant.
    decision = challenge(make_run(tmp_path, "run-b", seed=1))
    assert decision.outcome == "kept" and decision.reason.startswith("failed: ")
    assert "significance" in decision.reason and len(decision.checks) == 5
    assert decision.challenger_score != 1.0  # measured now, on the eval split, not read from the manifest
    run = tmp_path / "runs" / "run-b"
    assert json.loads((run / "decision.json").read_text()) == decision.to_dict()
    assert Manifest.load(run).champion == decision
    assert (run / ch.RELIABILITY).is_file()
    text = decision.to_markdown()
    assert "| check | result | figure | rule | threshold | detail |" in text and "| significance | FAIL |" in text
    assert ch.read_champion(tmp_path, "nightly").run_name == "run-a"
    # With every bound open (alpha 1, drops and rises of 1, gain from any value) it is promoted.
    opened = challenge(make_run(tmp_path, "run-c", seed=2), alpha=1.0, max_recall_drop=1, max_f1_drop=1, max_ece_rise=1)
    assert opened.promoted == (opened.checks[0].figure >= 0) and opened.reason.startswith(("passed all 5", "failed"))
