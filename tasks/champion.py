"""Champion tasks: challenge a slot's champion with a finished run, and score the champion.

Never cached: both read the slot as it is now, and the challenge moves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, pause_flow_run, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from tasks.artifacts import publish_image, publish_markdown, publish_table
from tasks.data import DatasetRef, ValidatedData
from tasks.names import run_name
from tasks.prefect_compat import reopen_expired_pause
from tasks.run import RunInfo
from visionflow.champion import RELIABILITY, Review, Reviewer, challenge, champion_report_markdown, evaluate_champion
from visionflow.config import ChampionConfig, PipelineConfig
from visionflow.manifest import ChampionDecision, Manifest

DECISION_KEY = "champion-decision"
CHECKS_KEY = "champion-checks"  # the gate's checks, a table artifact (with checks only)
RELIABILITY_KEY = "champion-reliability"  # both models' reliability diagrams (with checks only)
EVALUATION_KEY = "champion-evaluation"
# Emitted when a run becomes a slot's champion; automations.yaml notifies on it. The resource is
# the slot (visionflow.champion.<slot>); the payload is the decision (ChampionDecision.to_dict).
PROMOTED_EVENT = "visionflow.champion.promoted"
# Emitted when a challenger failed a check of the gate or its review kept the champion: same
# resource, the decision as payload (its `checks`, its `reason` naming the failed ones, its
# `review`); automations.yaml notifies on it too.
KEPT_EVENT = "visionflow.champion.kept"
REVIEW_POLL_SECONDS = 5  # how soon an answer given in the UI resumes the paused run (one API read each)


class ReviewForm(RunInput):
    """The form a reviewer answers in the Prefect UI (Resume, on the paused flow run)."""

    approve: bool = Field(False, description="On: promote the challenger. Off: keep the champion.")
    reason: str = Field("", description="Why; recorded in the decision (say why when you reject).")


def leaked_eval_files(dataset: DatasetRef, validated: ValidatedData) -> list[Path] | None:
    """The eval images with a near-duplicate in train, as the eval split names them; None when
    near-duplicates were not searched."""
    if validated.eval_leakage_rate is None:
        return None
    root = dataset.load().root
    return [root / relpath for relpath in validated.leaked]


def publish_checks(decision: ChampionDecision, run_dir: str) -> None:
    """With checks: their table and both models' reliability diagrams as artifacts."""
    if decision.checks:
        publish_table(CHECKS_KEY, decision.checks_table(), f"Champion '{decision.slot}': {decision.reason}")
        publish_image(RELIABILITY_KEY, Path(run_dir) / RELIABILITY, "Reliability: champion | challenger")


def publish_decision(decision: ChampionDecision, run_dir: str) -> None:
    """The decision's artifacts (markdown; with checks, their table and the reliability diagrams,
    unless published for its review already), its log line, and its event: promoted, or kept by a
    failed check or a review."""
    publish_markdown(DECISION_KEY, decision.to_markdown(), f"Champion '{decision.slot}': challenger {decision.outcome}")
    if decision.review is None:
        publish_checks(decision, run_dir)
    get_run_logger().info(
        "champion '%s': challenger %s (%s; data: %s)",
        decision.slot,
        decision.outcome,
        decision.reason,
        decision.data_changes or "no listing to compare",
    )
    if decision.promoted or decision.checks or decision.review:  # related: the flow run, its deployment, tags
        emit_event(
            PROMOTED_EVENT if decision.promoted else KEPT_EVENT,
            resource={
                "prefect.resource.id": f"visionflow.champion.{decision.slot}",
                "prefect.resource.name": decision.slot,
            },
            payload=decision.to_dict(),
        )


def ask_reviewer(approval: ChampionConfig, run_dir: str) -> Reviewer:
    """With champion.approval manual: pause the flow run for a reviewer's answer in the Prefect UI
    (the form shows the decision and its checks, published as artifacts too) until
    champion.approval_timeout_minutes."""

    def review(decision: ChampionDecision) -> Review:
        publish_checks(decision, run_dir)
        title = f"Promote run `{decision.challenger_run}` into champion slot `{decision.slot}`?"
        form = ReviewForm.with_initial_data(description=decision.to_markdown(title))
        get_run_logger().info(
            "champion '%s': challenger passed (%s); waiting up to %g minutes for a review (Resume in the UI)",
            decision.slot,
            decision.reason,
            approval.approval_timeout_minutes,
        )
        timeout = max(1, round(approval.approval_timeout_minutes * 60))
        try:
            answer = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=REVIEW_POLL_SECONDS)
        except FlowPauseTimeout:
            reopen_expired_pause(flow_run.id)  # a decision kept for want of an answer is not a failure
            return Review.timed_out(approval.approval_timeout_minutes)
        return Review(approved=answer.approve, reason=answer.reason.strip())

    return review


@task(cache_policy=NO_CACHE, task_run_name="challenge champion")
def challenge_champion(run: RunInfo, dataset: DatasetRef, validated: ValidatedData, config: PipelineConfig) -> Manifest:
    """With output.champion set: judge the run against that slot's champion on its eval split
    through champion.gates and promote it when it passes (with champion.approval manual, and a
    reviewer approves). Returns the run's manifest (with the decision, if any). A kept challenger
    is a decision, not a failure: the run completes."""
    if config.output.champion is None:
        return Manifest.load(run.run_dir)
    decision = challenge(
        run.run_dir,
        config.output.champion,
        config.training.monitor,
        validated.apply(dataset).eval_split,
        config.output.output_dir,
        config.data,
        config.training.device,
        config.champion.gates,
        leaked_eval_files(dataset, validated),
        ask_reviewer(config.champion, run.run_dir) if config.champion.approval == "manual" else None,
    )
    publish_decision(decision, run.run_dir)
    return Manifest.load(run.run_dir)  # now with the decision


@task(cache_policy=NO_CACHE, task_run_name=run_name("score champion on {dataset_name}"))
def score_champion(dataset: DatasetRef, config: PipelineConfig) -> dict[str, Any]:
    """Evaluate the champion in config.output.champion on the dataset's eval split."""
    eval_split = dataset.load().eval_split
    champion, report = evaluate_champion(
        config.output.output_dir,
        config.output.champion,
        eval_split,
        config.data,
        config.training.device,
    )
    publish_markdown(
        EVALUATION_KEY,
        champion_report_markdown(champion, report, eval_split.name),
        f"Champion '{champion.slot}' ({champion.run_name}): accuracy {report.accuracy:.2%}",
    )
    get_run_logger().info(
        "champion '%s' (%s): accuracy %.4f, loss %.4f on %s",
        champion.slot,
        champion.run_name,
        report.accuracy,
        report.loss,
        eval_split.name,
    )
    return {"slot": champion.slot, "version": champion.version, "run_name": champion.run_name, **report.to_dict()}
