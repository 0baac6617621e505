"""Champion / challenger on real exports and a real (tiny) evaluation split."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from visionflow import champion as ch
from visionflow.checkpoints import export_model, load_model
from visionflow.config import DataConfig, PipelineConfig
from visionflow.data.changes import LISTING_NAME, ListedFile, write_listing
from visionflow.data.splits import DatasetInfo, resolve_dataset
from visionflow.errors import CheckpointError, ConfigError, DatasetError
from visionflow.manifest import Manifest, MetricsRecord
from visionflow.models import build_model
from visionflow.runs import RunLayout
from visionflow.train.records import ModelSpec

CLASSES = ("airplane", "cat", "ship")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, sample_dataset: Path) -> DatasetInfo:
    root = tmp_path_factory.mktemp("tiny")
    for split, count in (("train", 2), ("val", 4)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for src in sorted((sample_dataset / split / name).iterdir())[:count]:
                shutil.copy(src, root / split / name / src.name)
    return resolve_dataset(str(root))


def make_run(out: Path, name: str, seed: int, metrics: dict[str, float]) -> Path:
    """A finished run folder as the pipeline leaves it: export/ and manifest.json."""
    torch.manual_seed(seed)
    spec = ModelSpec("tudui", len(CLASSES), 32, list(CLASSES), [0.5] * 3, [0.25] * 3)
    run_dir = out / "runs" / name
    export_model(build_model("tudui", len(CLASSES)), spec, run_dir / "export")
    values = {"eval_accuracy": 0.0, "eval_loss": 0.0, **metrics}
    record = MetricsRecord(**values, eval_top5=None, best_epoch=1, epochs_trained=1, per_class=[])
    Manifest.start(name, PipelineConfig(), "2026-01-01T00:00:00+00:00", None).finish("completed", metrics=record).save(
        run_dir
    )
    return run_dir


def challenge(run_dir: Path, out: Path, dataset: DatasetInfo, metric: str = "eval_accuracy") -> ch.ChampionDecision:
    return ch.challenge(
        run_dir, "nightly", metric, dataset.eval_split, out, DataConfig(data_dir=str(out)), device="cpu"
    )


def versions(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "models" / ".nightly").iterdir())


@pytest.mark.parametrize(
    "metric, challenger, champion, expected",
    [
        ("eval_accuracy", 0.6, 0.5, True),
        ("eval_accuracy", 0.5, 0.5, True),
        ("eval_accuracy", 0.4, 0.5, False),
        ("eval_loss", 0.9, 1.0, True),
        ("eval_loss", 1.0, 1.0, True),
        ("eval_loss", 1.1, 1.0, False),
    ],
)
def test_should_promote_when_at_least_as_good(metric: str, challenger: float, champion: float, expected: bool) -> None:
    assert ch._should_promote(challenger, champion, metric) is expected


def test_unknown_metric_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="Invalid champion metric 'f1'. Choose from: eval_accuracy, eval_loss"):
        ch.metric_direction("f1")


def test_empty_slot_promotes_and_records_the_decision(tmp_path: Path, dataset: DatasetInfo) -> None:
    run = make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3, "eval_loss": 1.1})
    decision = challenge(run, tmp_path, dataset)
    assert decision.promoted and decision.reason == "no champion in the slot yet"
    assert decision.champion_run is None and decision.champion_score is None
    slot = tmp_path / "models" / "nightly"
    assert slot.is_symlink() and not os.path.isabs(os.readlink(slot))  # relative: the output folder can move
    assert sorted(p.name for p in slot.iterdir()) == [
        "decision.json",
        "manifest.json",
        "model.json",
        "model.safetensors",
    ]
    _, spec = load_model(slot)
    assert spec.class_names == list(CLASSES)
    run_manifest = json.loads((run / "manifest.json").read_text())
    assert run_manifest["champion"]["outcome"] == "promoted"
    assert json.loads((slot / "manifest.json").read_text()) == run_manifest
    current = ch.read_champion(tmp_path, "nightly")
    assert current is not None and current.run_name == "run-a"
    assert current.weights_sha256 == decision.challenger_weights_sha256


def test_same_weights_are_kept_without_a_new_version(tmp_path: Path, dataset: DatasetInfo) -> None:
    challenge(make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3}), tmp_path, dataset)
    before = versions(tmp_path)
    decision = challenge(make_run(tmp_path, "run-b", seed=0, metrics={"eval_accuracy": 0.3}), tmp_path, dataset)
    assert (decision.outcome, decision.reason) == ("kept", "same weights")
    assert decision.champion_score == decision.challenger_score == 0.3
    assert decision.champion_run == "run-a"
    assert versions(tmp_path) == before
    assert (
        json.loads((tmp_path / "runs" / "run-b" / "manifest.json").read_text())["champion"]["reason"] == "same weights"
    )


@pytest.mark.parametrize("metric, better, worse", [("eval_accuracy", 1.0, -1.0), ("eval_loss", 0.0, 1e9)])
def test_champion_is_rescored_on_the_challengers_split(
    tmp_path: Path, dataset: DatasetInfo, metric: str, better: float, worse: float
) -> None:
    challenge(make_run(tmp_path, "run-a", seed=0, metrics={metric: 0.123457}), tmp_path, dataset, metric)
    kept = challenge(make_run(tmp_path, "run-b", seed=1, metrics={metric: worse}), tmp_path, dataset, metric)
    assert kept.outcome == "kept" and "is worse than champion" in kept.reason
    assert kept.champion_score is not None and kept.champion_score != 0.123457  # measured now
    assert kept.eval_split == "val" and kept.eval_images == 4 * len(CLASSES)
    assert ch.read_champion(tmp_path, "nightly").run_name == "run-a"
    promoted = challenge(make_run(tmp_path, "run-c", seed=2, metrics={metric: better}), tmp_path, dataset, metric)
    assert promoted.promoted and "is at least as good as champion" in promoted.reason
    assert promoted.champion_run == "run-a"
    assert ch.read_champion(tmp_path, "nightly").run_name == "run-c"


def test_old_versions_are_pruned_beyond_keep_previous(tmp_path: Path, dataset: DatasetInfo) -> None:
    for seed in range(ch.KEEP_PREVIOUS + 3):
        challenge(
            make_run(tmp_path, f"run-{seed}", seed=seed, metrics={"eval_loss": -seed}), tmp_path, dataset, "eval_loss"
        )
    kept = versions(tmp_path)
    assert len(kept) == ch.KEEP_PREVIOUS + 1
    assert os.readlink(tmp_path / "models" / "nightly").endswith(kept[-1])


def test_failed_promotion_leaves_the_champion_intact(tmp_path: Path, dataset: DatasetInfo) -> None:
    challenge(make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.0}), tmp_path, dataset)
    before = versions(tmp_path)
    broken = make_run(tmp_path, "run-b", seed=1, metrics={"eval_accuracy": 1.0})
    decision = ch.decide(
        "nightly",
        "eval_accuracy",
        "run-b",
        1.0,
        "f" * 64,
        ch.read_champion(tmp_path, "nightly"),
        0.0,
        dataset.eval_split,
    )
    (broken / "export" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        ch.promote(broken, {}, decision, tmp_path)
    assert versions(tmp_path) == before  # no staging folder left behind
    assert ch.read_champion(tmp_path, "nightly").run_name == "run-a"


def test_plain_folder_in_the_slot_is_refused(tmp_path: Path, dataset: DatasetInfo) -> None:
    (tmp_path / "models" / "nightly").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="is a plain folder: expected a link"):
        challenge(make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3}), tmp_path, dataset)


def test_champion_with_other_classes_cannot_be_compared(tmp_path: Path, dataset: DatasetInfo) -> None:
    challenge(make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3}), tmp_path, dataset)
    split = replace(dataset.eval_split, classes=("a", "b", "c"))
    with pytest.raises(
        DatasetError,
        match=r"classes \['a', 'b', 'c'\] do not match the model's class_names \['airplane', 'cat', 'ship'\]",
    ):
        ch.challenge(
            make_run(tmp_path, "run-b", seed=1, metrics={"eval_accuracy": 0.3}),
            "nightly",
            "eval_accuracy",
            split,
            tmp_path,
            DataConfig(data_dir=str(tmp_path)),
            device="cpu",
        )


def test_a_run_without_metrics_cannot_challenge(tmp_path: Path, dataset: DatasetInfo) -> None:
    # The typed manifest always has both metrics once a run completed; a run that did not
    # complete has none, and is refused naming its manifest.
    run = make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3})
    Manifest.load(run).model_copy(update={"metrics": None, "status": "failed"}).save(run)
    with pytest.raises(CheckpointError, match="manifest.json' has no metrics: expected a completed run"):
        challenge(run, tmp_path, dataset, "eval_loss")


def test_evaluate_champion(tmp_path: Path, dataset: DatasetInfo) -> None:
    with pytest.raises(CheckpointError, match="is empty: train with output.champion=nightly"):
        ch.evaluate_champion(tmp_path, "nightly", dataset.eval_split, DataConfig(data_dir=str(tmp_path)), device="cpu")
    challenge(make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3}), tmp_path, dataset)
    current, report = ch.evaluate_champion(
        tmp_path, "nightly", dataset.eval_split, DataConfig(data_dir=str(tmp_path)), device="cpu"
    )
    assert current.run_name == "run-a" and report.num_images == 4 * len(CLASSES)
    assert 0.0 <= report.accuracy <= 1.0


def test_a_champion_is_streamed_when_its_split_does_not_fit_the_memory_budget(
    tmp_path: Path, dataset: DatasetInfo
) -> None:
    challenge(make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3}), tmp_path, dataset)
    in_memory = DataConfig(data_dir=str(tmp_path / "memory"))
    streamed = DataConfig(data_dir=str(tmp_path / "stream"), memory_budget_mb=0.001, num_workers=0)
    _, memory_report = ch.evaluate_champion(tmp_path, "nightly", dataset.eval_split, in_memory, device="cpu")
    _, stream_report = ch.evaluate_champion(tmp_path, "nightly", dataset.eval_split, streamed, device="cpu")
    assert stream_report.to_dict() == memory_report.to_dict()
    assert any((tmp_path / "memory").rglob("*.pt")) and not (tmp_path / "stream").exists()  # nothing decoded to disk


def test_decision_markdown_has_both_scores_and_the_reason(dataset: DatasetInfo) -> None:
    decision = ch.decide("nightly", "eval_loss", "run-b", 0.9, "b" * 64, None, None, dataset.eval_split)
    text = decision.to_markdown()
    assert "challenger **promoted**" in text and "no champion in the slot yet" in text
    assert "| challenger | run-b | 0.9000 |" in text and "| champion | (none) | n/a |" in text


def test_champion_report_markdown(tmp_path: Path, dataset: DatasetInfo) -> None:
    challenge(make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3}), tmp_path, dataset)
    current, report = ch.evaluate_champion(
        tmp_path, "nightly", dataset.eval_split, DataConfig(data_dir=str(tmp_path)), device="cpu"
    )
    text = ch.champion_report_markdown(current, report, "val")
    assert "## Champion `nightly`: run run-a" in text and f"({report.num_images} images)" in text
    assert f"| {report.accuracy:.4f} | {report.loss:.4f} | n/a |" in text
    assert sum(line.startswith(("| airplane |", "| cat |", "| ship |")) for line in text.splitlines()) == 3


def test_evaluate_champion_needs_a_slot(tmp_path: Path, dataset: DatasetInfo) -> None:
    with pytest.raises(ConfigError, match="'output.champion': None; expected the champion slot"):
        ch.evaluate_champion(tmp_path, None, dataset.eval_split, DataConfig(data_dir=str(tmp_path)), device="cpu")


def test_concurrent_challengers_are_judged_one_after_the_other(tmp_path: Path, dataset: DatasetInfo) -> None:
    runs = [make_run(tmp_path, f"run-{seed}", seed=seed, metrics={"eval_accuracy": 1.0}) for seed in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        decisions = list(pool.map(lambda run: challenge(run, tmp_path, dataset), runs))
    assert all(d.promoted for d in decisions)
    first, second = sorted(decisions, key=lambda d: d.champion_run is not None)
    assert first.champion_run is None and second.champion_run == first.challenger_run


def test_the_decision_cites_the_data_changes_against_the_champion(tmp_path: Path, dataset: DatasetInfo) -> None:
    champion_files = [ListedFile("train", f"train/cat/{i}.png", "cat", f"{i:064x}", "32x32") for i in range(3)]
    champion_run = make_run(tmp_path, "run-a", seed=0, metrics={"eval_accuracy": 0.3})
    write_listing(champion_files, RunLayout(champion_run).data_listing)
    markdown, description = ch.data_changes_report(champion_run, tmp_path, "nightly")
    assert description == "No earlier data" and "No champion or earlier run" in markdown
    challenge(champion_run, tmp_path, dataset)  # promoted into the empty slot, with its listing
    assert (tmp_path / "models" / "nightly" / LISTING_NAME).is_file()

    challenger = make_run(tmp_path, "run-b", seed=1, metrics={"eval_accuracy": 0.4})
    extra = ListedFile("train", "train/dog/new.png", "dog", "f" * 64, "32x32")
    write_listing([*champion_files, extra], RunLayout(challenger).data_listing)
    markdown, description = ch.data_changes_report(challenger, tmp_path, "nightly")
    assert description == "Against champion 'nightly' (run-a): trained on +1 images"
    assert "`train/dog/new.png`" in markdown
    decision = challenge(challenger, tmp_path, dataset)
    assert decision.data_changes == "trained on +1 images"
    assert "Data: challenger trained on +1 images, against the champion's data." in decision.to_markdown()
    manifest = json.loads((challenger / "manifest.json").read_text())
    assert manifest["champion"]["data_changes"] == "trained on +1 images"
    # Without a champion slot the run is compared with the newest earlier run that has a listing.
    assert ch.data_changes_report(challenger, tmp_path, None)[1] == "Against run run-a: trained on +1 images"
