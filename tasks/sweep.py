"""Sweep bookkeeping tasks: the leaderboard (table artifact `sweep-<name>`, leaderboard.json,
TensorBoard hparams per trial) and the summary with the best config. Never cached: they describe
this sweep run as its trials finish."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.artifacts import publish_markdown, publish_table
from visionflow.manifest import Manifest
from visionflow.sweep import (
    TrialRow,
    leaderboard_key,
    leaderboard_records,
    summary_markdown,
    write_leaderboard,
    write_trial_hparams,
)


@task(cache_policy=NO_CACHE, task_run_name="leaderboard after {row.trial}")
def record_trial(name: str, sweep_root: str, rows: list[TrialRow], row: TrialRow, metric: str) -> None:
    """A trial finished (`row`, already in `rows`): its hparams to the sweep's TensorBoard, the
    leaderboard to leaderboard.json and to the table artifact `sweep-<name>` (a new version)."""
    if row.metric is not None:
        write_trial_hparams(sweep_root, row, metric)
    write_leaderboard(sweep_root, rows, metric)
    publish_table(leaderboard_key(name), leaderboard_records(rows, metric), f"Sweep {name}: trials by {metric}")
    detail = f"{metric} {row.metric:.4f}" if row.metric is not None else row.error
    get_run_logger().info("trial %s %s (%s)", row.trial, row.state, detail)


@task(cache_policy=NO_CACHE, task_run_name="summarize sweep {name}")
def publish_sweep_summary(name: str, rows: list[TrialRow], metric: str, best: Manifest | None) -> None:
    """The sweep's summary artifact, with the best trial's config as YAML."""
    publish_markdown(f"{leaderboard_key(name)}-summary", summary_markdown(name, rows, metric, best), f"Sweep {name}")
