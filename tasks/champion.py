"""Champion tasks: challenge a slot's champion with a finished run, and score the champion.

Never cached: both read the slot as it is now, and the challenge moves it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from tasks.artifacts import publish_image, publish_markdown, publish_table
from tasks.data import DatasetRef, ValidatedData
from tasks.names import run_name
from tasks.run import RunInfo
from visionflow.champion import RELIABILITY, challenge, champion_report_markdown, evaluate_champion
from visionflow.config import PipelineConfig
from visionflow.manifest import ChampionDecision, Manifest

DECISION_KEY = "champion-decision"
CHECKS_KEY = "champion-checks"  # the gate's checks, a table artifact (with checks only)
RELIABILITY_KEY = "champion-reliability"  # both models' reliability diagrams (with checks only)
EVALUATION_KEY = "champion-evaluation"
# Emitted when a run becomes a slot's champion; automations.yaml notifies on it. The resource is
# the slot (visionflow.champion.<slot>); the payload is the decision (ChampionDecision.to_dict).
PROMOTED_EVENT = "visionflow.champion.promoted"
# Emitted when a challenger failed a check of the gate: same resource, the decision as payload
# (its `checks`, its `reason` naming the failed ones); an automation can alert on it.
KEPT_EVENT = "visionflow.champion.kept"


def leaked_eval_files(dataset: DatasetRef, validated: ValidatedData) -> list[Path] | None:
    """The eval images with a near-duplicate in train, as the eval split names them; None when
    near-duplicates were not searched."""
    if validated.eval_leakage_rate is None:
        return None
    root = dataset.load().root
    return [root / relpath for relpath in validated.leaked]


def publish_decision(decision: ChampionDecision, run_dir: str) -> None:
    """The decision's artifacts (markdown; with checks, their table and the reliability diagrams),
    its log line, and its event: promoted, or kept by a failed check."""
    publish_markdown(DECISION_KEY, decision.to_markdown(), f"Champion '{decision.slot}': challenger {decision.outcome}")
    if decision.checks:
        publish_table(CHECKS_KEY, decision.checks_table(), f"Champion '{decision.slot}': {decision.reason}")
        publish_image(RELIABILITY_KEY, Path(run_dir) / RELIABILITY, "Reliability: champion | challenger")
    get_run_logger().info(
        "champion '%s': challenger %s (%s; data: %s)",
        decision.slot,
        decision.outcome,
        decision.reason,
        decision.data_changes or "no listing to compare",
    )
    if decision.promoted or decision.checks:  # the flow run, its deployment and tags are related resources
        emit_event(
            PROMOTED_EVENT if decision.promoted else KEPT_EVENT,
            resource={
                "prefect.resource.id": f"visionflow.champion.{decision.slot}",
                "prefect.resource.name": decision.slot,
            },
            payload=decision.to_dict(),
        )


@task(cache_policy=NO_CACHE, task_run_name="challenge champion")
def challenge_champion(run: RunInfo, dataset: DatasetRef, validated: ValidatedData, config: PipelineConfig) -> Manifest:
    """With output.champion set: judge the run against that slot's champion on its eval split
    through champion.gates and promote it when it passes. Returns the run's manifest (with the
    decision, if any). A kept challenger is a decision, not a failure: the run completes."""
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
