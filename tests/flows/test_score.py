"""The `score-images` flow on the session's Prefect API: a table, the class counts and the least
confident images as artifacts, an unchanged rerun a cache hit; the `score-inbox` deployment of
prefect.yaml: its parameters are a valid ScoreConfig and its trigger matches the event a promotion emits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from flows.score import score_images_flow
from tasks.champion import PROMOTED_EVENT
from tasks.scoring import CLASS_COUNTS_KEY, LOWEST_KEY
from tests.helpers import REPO, artifact_data, artifact_keys, task_states
from visionflow.checkpoints import export_model
from visionflow.scoring import ScoreConfig
from visionflow.train.records import ModelSpec

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.timeout(300)]
CLASSES = ["airplane", "automobile", "cat", "ship"]


@pytest.fixture
def config(tmp_path: Path, cifar_mini: Path) -> ScoreConfig:
    torch.manual_seed(0)
    spec = ModelSpec("tudui", len(CLASSES), 32, CLASSES, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    export_model(spec.build(), spec, tmp_path / "model")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for image in sorted((cifar_mini / "val" / "cat").iterdir())[:20]:
        shutil.copy(image, inbox / image.name)
    (inbox / "broken.png").write_bytes(b"\x89PNG not really")
    return ScoreConfig(
        inputs=str(inbox),
        checkpoint=str(tmp_path / "model"),
        table=str(tmp_path / "scores" / "inbox.csv"),
        output_dir=str(tmp_path / "artifacts"),
        num_workers=0,
        device="cpu",
    )


def test_scoring_flow_publishes_its_table_and_a_rerun_is_cached(config: ScoreConfig) -> None:
    state = score_images_flow(config, return_state=True)
    summary = state.result()
    assert (summary["images"], summary["scored"], summary["unreadable"]) == (21, 21, 1)
    assert Path(config.table).is_file() and Path(config.table).with_suffix(".lowest.png").is_file()
    flow_run_id = str(state.state_details.flow_run_id)
    assert {CLASS_COUNTS_KEY, LOWEST_KEY} <= artifact_keys(flow_run_id)
    counts = {row["class"]: row["images"] for row in artifact_data(flow_run_id, CLASS_COUNTS_KEY)}
    assert sum(counts.values()) == 21 and counts["(unreadable)"] == 1
    assert "data:image/png;base64," in artifact_data(flow_run_id, LOWEST_KEY)
    assert task_states(flow_run_id)["score_task"] == "Completed"

    again = score_images_flow(config, return_state=True)
    assert again.result() == summary
    assert task_states(str(again.state_details.flow_run_id))["score_task"] == "Cached"


def test_score_inbox_deployment_scores_after_each_promotion() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.events.schemas.events import Resource

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    (deployment,) = [d for d in deployments if d["name"] == "score-inbox"]
    assert deployment["entrypoint"] == "flows/score.py:score_images_flow" and score_images_flow.name == "score-images"
    config = ScoreConfig.model_validate(deployment["parameters"]["config"])
    assert config.checkpoint == "champion:nightly" and deployment["enforce_parameter_schema"]
    (trigger,) = [DeploymentEventTrigger.model_validate(t) for t in deployment["triggers"]]
    assert trigger.expect == {PROMOTED_EVENT}
    # the resource tasks/champion.py emits a promotion of the `nightly` slot with, and another slot's
    promoted = {"prefect.resource.id": "visionflow.champion.nightly", "prefect.resource.name": "nightly"}
    other = {"prefect.resource.id": "visionflow.champion.weekly", "prefect.resource.name": "weekly"}
    assert trigger.match.includes([Resource(promoted)]) and not trigger.match.includes([Resource(other)])
