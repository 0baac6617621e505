"""Sweep core: the space checked against PipelineConfig, deterministic proposals, stable trial
names, the ranking and the leaderboard's records and summary."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from visionflow.config import PipelineConfig, load_config
from visionflow.errors import ConfigError
from visionflow.manifest import Manifest
from visionflow.sweep import (
    SAMPLED_TRIALS,
    SweepConfig,
    TrialProposer,
    TrialRow,
    build_sweep,
    check_space,
    leaderboard_key,
    leaderboard_records,
    ranked,
    summary_markdown,
    sweep_name,
    trial_config,
    trial_threads,
)

BASE = PipelineConfig()
SPACE = {
    "optim.lr": {"low": 1e-4, "high": 1e-1, "log": True},
    "model.name": ["tudui", "resnet18_cifar"],
    "training.epochs": {"low": 1, "high": 4},
}


def proposals(method: str, seed: int, max_trials: int = 8, parallel: int = 2) -> list[dict]:
    """Every trial the method proposes, each batch told a metric that depends on its values (as
    trials' results do), so optuna's later batches follow from the earlier ones."""
    sweep = build_sweep(
        {"space": SPACE, "method": method, "seed": seed, "max_trials": max_trials, "parallel": parallel}
    )
    proposer = TrialProposer(check_space(BASE, sweep), sweep, "max")
    trials: list[dict] = []
    while batch := proposer.next_batch():
        trials += batch
        proposer.report([-abs(math.log10(p["optim.lr"]) + 2.5) + p["training.epochs"] / 10 for p in batch])
    return trials


@pytest.mark.parametrize("method", ["random", "optuna"])
def test_a_seed_proposes_the_same_trials_twice(method: str) -> None:
    first = proposals(method, seed=7)
    assert len(first) == 8 and first == proposals(method, seed=7)
    assert first != proposals(method, seed=8)
    for params in first:
        assert 1e-4 <= params["optim.lr"] <= 1e-1 and params["model.name"] in ("tudui", "resnet18_cifar")
        assert params["training.epochs"] in (1, 2, 3, 4)


def test_optuna_proposes_parallel_trials_a_batch_and_learns_from_failures() -> None:
    sweep = build_sweep({"space": SPACE, "method": "optuna", "seed": 0, "max_trials": 5, "parallel": 2})
    proposer = TrialProposer(check_space(BASE, sweep), sweep, "min")
    sizes = []
    while batch := proposer.next_batch():
        sizes.append(len(batch))
        proposer.report([None] * len(batch))  # failed trials are told as failed, not as a value
    assert sizes == [2, 2, 1]


def test_grid_is_every_combination_in_order_up_to_max_trials() -> None:
    space = {"optim.lr": [0.001, 0.01], "training.seed": [0, 1, 2]}
    sweep = SweepConfig(space=space)
    proposer = TrialProposer(check_space(BASE, sweep), sweep, "max")
    assert proposer.next_batch() == [
        {"optim.lr": lr, "training.seed": seed} for lr in (0.001, 0.01) for seed in (0, 1, 2)
    ]
    assert proposer.next_batch() == []
    capped = SweepConfig(space=space, max_trials=4)
    assert len(TrialProposer(check_space(BASE, capped), capped, "max").next_batch()) == 4
    sampled = SweepConfig(space=space, method="random")
    assert len(TrialProposer(check_space(BASE, sampled), sampled, "max").next_batch()) == SAMPLED_TRIALS


def test_space_values_are_checked_and_stored_as_the_config_stores_them() -> None:
    # YAML reads 1e-3 (no dot) as a string; the config reads it as the float it means.
    sweep = SweepConfig(space={"optim.lr": ["1e-3", 0.01], "data.augment": [True, False]})
    assert check_space(BASE, sweep) == {"optim.lr": [0.001, 0.01], "data.augment": [True, False]}
    with pytest.raises(ConfigError, match=r"^Invalid sweep key 'training.epoch': no such config field\. Choose from: "):
        check_space(BASE, SweepConfig(space={"training.epoch": [1]}))
    with pytest.raises(ConfigError, match=r"^Sweep space: Invalid config field 'training.epochs'"):
        check_space(BASE, SweepConfig(space={"training.epochs": [1, 0]}))
    with pytest.raises(ConfigError, match=r"^Sweep space: Invalid config field 'optim.lr'"):
        check_space(BASE, SweepConfig(space={"optim.lr": {"low": 1e-3, "high": 20.0}}, method="random"))
    with pytest.raises(ConfigError, match="has no values to try"):
        check_space(BASE, SweepConfig(space={"optim.lr": []}))
    with pytest.raises(ConfigError, match="Sweep space is empty"):
        check_space(BASE, SweepConfig(space={}))
    with pytest.raises(ConfigError, match=r"Invalid sweep field 'space\.optim\.lr.*log range needs low > 0"):
        build_sweep({"space": {"optim.lr": {"low": 0, "high": 1, "log": True}}})


def test_trial_names_are_stable_and_follow_the_config() -> None:
    params = {"optim.lr": 0.01}
    config = trial_config(BASE, params, "lr", 3)
    assert config.output.run_name.startswith("lr-003-") and len(config.output.run_name) == len("lr-003-") + 6
    assert config.output.champion is None and config.optim.optimizer == "adamw"  # resolved
    assert trial_config(BASE, params, "lr", 3) == config
    other_base = load_config(None, {"training.epochs": 2})
    assert trial_config(other_base, params, "lr", 3).output.run_name != config.output.run_name
    assert trial_config(BASE, {"optim.lr": 0.02}, "lr", 3).output.run_name != config.output.run_name
    # a sweep without a name is named after its space, method, seed and max_trials
    assert sweep_name(SweepConfig(space={"optim.lr": [0.01]})) == sweep_name(SweepConfig(space={"optim.lr": [0.01]}))
    assert sweep_name(SweepConfig(space={"optim.lr": [0.01]}, seed=1)) != sweep_name(
        SweepConfig(space={"optim.lr": [0.01]})
    )
    assert leaderboard_key("My_Sweep.v2") == "sweep-my-sweep-v2"


def test_threads_share_the_cores() -> None:
    assert [trial_threads(p, cores=8) for p in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def row(trial: str, metric: float | None, loss: float | None = None) -> TrialRow:
    state = "failed" if metric is None else "completed"
    error = "Training diverged in epoch 1" if metric is None else None
    return TrialRow(
        trial=trial,
        params={"optim.lr": 0.1},
        state=state,
        metric=metric,
        eval_loss=loss,
        run_dir=f"/r/{trial}",
        error=error,
    )


def test_ranking_follows_the_metric_direction_and_puts_failed_trials_last() -> None:
    rows = [row("a", 0.5), row("b", None), row("c", 0.9), row("d", 0.7)]
    assert [r.trial for r in ranked(rows, "eval_accuracy")] == ["c", "d", "a", "b"]
    assert [r.trial for r in ranked(rows, "eval_loss")] == ["a", "d", "c", "b"]  # lower is better
    records = leaderboard_records(rows, "eval_accuracy")
    assert [r["rank"] for r in records] == [1, 2, 3, "-"]
    assert records[-1]["state"] == "failed: Training diverged in epoch 1"
    assert list(records[0])[:3] == ["rank", "trial", "optim.lr"] and records[0]["eval_accuracy"] == 0.9


def test_summary_carries_the_best_config_ready_for_train(tmp_path: Path) -> None:
    config = trial_config(BASE, {"optim.lr": 0.01}, "lr", 0)
    best = Manifest.start(config.output.run_name, config, "2026-01-01T00:00:00+00:00", None)
    markdown = summary_markdown("lr", [row("lr-000-abcdef", 0.8), row("lr-001-abcdef", None)], "eval_accuracy", best)
    assert "Best: **lr-000-abcdef** (optim.lr=0.1): eval_accuracy 0.8000" in markdown
    assert "1 completed, 1 failed" in markdown
    pasted = markdown.split("```yaml\n")[1].split("```")[0]
    (tmp_path / "best.yaml").write_text(pasted)
    again = load_config(tmp_path / "best.yaml")
    assert again.optim.lr == 0.01 and again.output.run_name is None
    assert yaml.safe_load(pasted)["optim"]["optimizer"] == "adamw"
