"""The `score-images` flow on the session's Prefect API (a real server): a table, the class counts
and the least confident images as artifacts, an unchanged rerun a cache hit; the `score-inbox`
deployment of prefect.yaml: deployed with `prefect deploy`, its trigger on the event a promotion
emits, and a run of it taken by a process worker."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from flows.score import score_images_flow
from tasks.champion import PROMOTED_EVENT
from tasks.scoring import CLASS_COUNTS_KEY, LOWEST_KEY
from tests.flows.server_fixtures import PREFECT, run_worker_once
from tests.helpers import REPO, artifact_data, artifact_keys, cli_env, task_states
from visionflow.checkpoints import export_model
from visionflow.scoring import ScoreConfig
from visionflow.train.records import ModelSpec

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.timeout(300)]
CLASSES = ["airplane", "automobile", "cat", "ship"]
DEPLOYMENT = "score-images/score-inbox"


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
        table=str(tmp_path / "scores" / "inbox.parquet"),
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


def deployed() -> str:
    """`prefect deploy --name score-inbox` from prefect.yaml, onto the session's API; the pool it names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    (deployment,) = [
        d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"] if d["name"] == "score-inbox"
    ]
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=deployment["work_pool"]["name"], type="process"))
        except ObjectAlreadyExists:
            pass
    command = [PREFECT, "--no-prompt", "deploy", "--name", "score-inbox"]
    done = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return deployment["work_pool"]["name"]


@pytest.mark.slow
def test_score_inbox_deployment_runs_on_a_worker_and_after_each_promotion(config: ScoreConfig, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.events import Resource

    pool = deployed()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        assert [s.schedule.cron for s in deployment.schedules] == ["30 5 * * *"]
        assert ScoreConfig.model_validate(deployment.parameters["config"]).checkpoint == "champion:nightly"
        (automation,) = [a for a in client.read_automations() if a.name.startswith("score-inbox")]
        assert automation.trigger.expect == {PROMOTED_EVENT}
        # the resource tasks/champion.py emits a promotion of the `nightly` slot with, and another slot's
        promoted = {"prefect.resource.id": "visionflow.champion.nightly", "prefect.resource.name": "nightly"}
        other = {"prefect.resource.id": "visionflow.champion.weekly", "prefect.resource.name": "weekly"}
        assert automation.trigger.match.includes([Resource(promoted)])
        assert not automation.trigger.match.includes([Resource(other)])

        parameters = {"config": config.model_dump()}
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        run_worker_once(SimpleNamespace(env=cli_env()), pool, REPO, tmp_path / "worker.log", timeout=180)
        state = client.read_flow_run(flow_run.id).state
    assert state is not None and state.is_completed(), (state, (tmp_path / "worker.log").read_text()[-3000:])
    assert Path(config.table).is_file() and task_states(str(flow_run.id))["score_task"] in {"Completed", "Cached"}
