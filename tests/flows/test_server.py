"""The deployments of prefect.yaml on a real Prefect server, run by a real process worker.

One server for the module per database (on 127.0.0.1:<free port>, with a temporary PREFECT_HOME):
SQLite for every test, and PostgreSQL (a cluster of its own) for those marked `on_postgresql_too`.
The repository's own prefect.yaml is deployed with `prefect deploy --all`, and runs are triggered with
test parameters (tiny data, one epoch, outputs in a temporary folder) through
`prefect deployment run --params`: a run's `config` replaces the deployment's. Then the UI
(headless Chromium) must show the run's artifacts.

Much of what a run leaves on the server arrives after the worker returns: logs are shipped in
batches, task-run states arrive as events the server records asynchronously, the UI renders
piece by piece. So every read below waits (bounded, failing with what it saw) for exactly what
the test then asserts, never for something else or for a fixed time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Cancelling, Crashed, Pending, Running, Scheduled

from flows.alerts import AUTOMATIONS_FILE
from tests.flows.server_fixtures import (
    CHROMIUM,
    DATABASES,
    PREFECT,
    SQLITE,
    PrefectServer,
    WebhookReceiver,
    chromium_text,
    prefect_server,
    run_cli,
    run_worker_once,
)
from tests.helpers import background, copy_tiny_dataset, processes_with_env, tail, task_name, wait_for
from visionflow.checkpoints import load_checkpoint

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
POOL = "visionflow"  # prefect.yaml's work pool
ON_DEMAND = "train-pipeline/train-on-demand"
CLASSES = ("airplane", "cat", "frog", "ship")
SLOT = "ondemand-test"
RUN_KEYS = ("run-summary", "champion-decision")
RUN_SECONDS = 420  # worker(s) taking a run to its end on a busy 2-core machine
RECORD_SECONDS = 60  # logs, task-run states and artifacts of an ended run reaching the API
# visionflow-crash-retry reschedules a run that stayed Crashed for its 60 s window, and the server
# checks proactive triggers once per window: 120 s at most, plus slack on a busy machine.
RETRY_SECONDS = 180
RETRIED_BY = "Crashed; retried automatically by the automation visionflow-crash-retry"


# The tests that run on a server on PostgreSQL as well: deploying, a worker's run with its
# artifacts, logs and cached task runs, the champion, every alert. Not on PostgreSQL (SQLite only),
# to keep the suite short: a second run of another deployment (evaluate-champion), the UI,
# cancellation, and the crash retries (the worker, the automations and the orchestration rules,
# on the same API calls as the tests here; the crash test alone takes 2.5 to 5 minutes);
# decorating one more test adds it.
on_postgresql_too = pytest.mark.parametrize("server", DATABASES, indirect=True)


@pytest.fixture(scope="module", params=[SQLITE])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One server per database for the module's tests (pytest runs those of one database together)."""
    with prefect_server(tmp_path_factory.mktemp(f"prefect-server-{request.param}"), request.param) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: PrefectServer) -> Iterator[SyncPrefectClient]:
    with SyncPrefectClient(server.api_url) as prefect_client:
        yield prefect_client


@pytest.fixture(scope="module")
def deployed(server: PrefectServer) -> str:
    """The work pool and every deployment of the repository's prefect.yaml; returns the deploy output."""
    run_cli([PREFECT, "work-pool", "create", POOL, "--type", "process"], server.env, REPO)
    return run_cli([PREFECT, "--no-prompt", "deploy", "--all"], server.env, REPO, timeout=240)


@pytest.fixture(scope="module")
def webhook(server: PrefectServer) -> Iterator[WebhookReceiver]:
    """One receiver per server (per database): it holds the alerts of that server only."""
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def alerts(deployed: str, server: PrefectServer, webhook: WebhookReceiver) -> str:
    """automations.yaml applied with `visionflow alerts apply`, notifying `webhook`; returns its output."""
    return run_cli(
        [sys.executable, "-m", "flows.cli", "alerts", "apply", "--webhook-url", webhook.url], server.env, REPO
    )


@pytest.fixture(scope="module")
def run_config(server: PrefectServer, sample_dataset: Path) -> dict[str, Any]:
    """Data and outputs beside the server's home: each server (database) starts with no champion."""
    root = server.home.parent / "run"
    tiny = copy_tiny_dataset(sample_dataset, root / "tiny", CLASSES, train=10, val=5)
    return {
        "data": {"dataset": str(tiny), "data_dir": str(root / "data"), "batch_size": 16},
        "model": {"name": "tudui"},
        "training": {"epochs": 1, "device": "cpu"},
        "output": {"output_dir": str(root / "out"), "champion": SLOT},
    }


def trigger(server: PrefectServer, deployment: str, config: dict[str, Any]) -> UUID:
    """`prefect deployment run` with the whole config as --params; returns the flow run id."""
    output = run_cli(
        [PREFECT, "deployment", "run", deployment, "--params", json.dumps({"config": config})], server.env, REPO
    )
    return UUID(re.search(r"UUID: ([0-9a-f-]{36})", output).group(1))


def run_to_end(server: PrefectServer, client: SyncPrefectClient, flow_run_id: UUID, log: Path) -> FlowRun:
    """Run a process worker (`--run-once`: it takes the runs due now and returns when they end)
    until the flow run is in a final state, and return the run. Another worker is started only
    while the run is still scheduled (not yet due, or awaiting a concurrency slot)."""
    deadline = time.monotonic() + RUN_SECONDS
    while True:
        run_worker_once(server, POOL, REPO, log, timeout=max(deadline - time.monotonic(), 30))
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is None or not flow_run.state.is_scheduled() or time.monotonic() > deadline:
            break
    if flow_run.state is None or not flow_run.state.is_final():  # taken by the worker: its end is being recorded
        flow_run = wait_for(
            lambda: client.read_flow_run(flow_run_id),
            lambda run: run.state is not None and run.state.is_final(),
            RECORD_SECONDS,
            lambda run: f"flow run {flow_run_id} still {run.state}:\n{log.read_text()[-3000:]}",
        )
    assert flow_run.state is not None and flow_run.state.is_final(), f"run still {flow_run.state}"
    return flow_run


def all_logs(client: SyncPrefectClient, flow_run_id: UUID) -> list[str]:
    """Every stored log message of the run, page by page (a page holds at most 200)."""
    messages: list[str] = []
    while True:
        page = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=len(messages)
        )
        messages += [log.message for log in page]
        if len(page) < 200:
            return messages


def logs_of(client: SyncPrefectClient, flow_run_id: UUID, containing: str) -> list[str]:
    """The run's stored log messages, once one of them contains `containing` (the flow-run
    process ships logs in batches, the last ones just before it exits)."""
    return wait_for(
        lambda: all_logs(client, flow_run_id),
        lambda messages: any(containing in m for m in messages),
        RECORD_SECONDS,
        lambda messages: (
            f"no log of flow run {flow_run_id} contains {containing!r} "
            f"({len(messages)} logs; the last ones: {messages[-10:]})"
        ),
    )


def artifact_keys(client: SyncPrefectClient, flow_run_id: UUID, *expected: str) -> set[str]:
    """The keys of the run's artifacts, once they include every key of `expected`."""

    def read() -> set[str]:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        return {artifact.key for artifact in artifacts if artifact.key}

    return wait_for(
        read,
        lambda keys: set(expected) <= keys,
        RECORD_SECONDS,
        lambda keys: f"flow run {flow_run_id} has artifacts {sorted(keys)}, not all of {sorted(expected)}",
    )


def task_runs_of(client: SyncPrefectClient, flow_run_id: UUID, names: Iterable[str]) -> list[TaskRun]:
    """The run's task runs, once each task of `names` has one and every task run recorded is in a
    final state (task-run states reach the server as events, recorded after the flow run ends)."""
    names = set(names)

    def done(runs: list[TaskRun]) -> bool:
        return names <= {task_name(run) for run in runs} and all(
            run.state is not None and run.state.is_final() for run in runs
        )

    return wait_for(
        lambda: client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))),
        done,
        RECORD_SECONDS,
        lambda runs: (
            f"task runs of {flow_run_id} not all final, or not one for each of {sorted(names)}: "
            f"{sorted((run.name, run.state.name if run.state else None) for run in runs)}"
        ),
    )


def manifest_of(config: dict[str, Any], flow_run: FlowRun) -> dict[str, Any]:
    runs = Path(config["output"]["output_dir"]) / "runs"
    return json.loads((runs / flow_run.name / "manifest.json").read_text())


@on_postgresql_too
def test_nightly_schedule_and_deployments_are_registered(deployed: str, client: SyncPrefectClient) -> None:
    nightly = client.read_deployment_by_name("train-pipeline/nightly-retrain")
    assert [(s.active, s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [
        (True, "30 2 * * *", "Europe/Berlin")
    ]
    assert nightly.work_pool_name == POOL and nightly.enforce_parameter_schema
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert nightly.parameters["config"]["output"]["champion"] == "nightly"
    # `{{ $PWD }}` resolved by `prefect deploy` to the clone it ran in.
    assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    on_demand = client.read_deployment_by_name(ON_DEMAND)
    assert on_demand.schedules == [] and on_demand.concurrency_options.collision_strategy == "ENQUEUE"
    finetune = client.read_deployment_by_name("train-pipeline/finetune-on-demand")
    assert finetune.parameters["config"]["model"] == {"name": "resnet18", "weights": "imagenet"}
    assert finetune.enforce_parameter_schema and finetune.schedules == []
    evaluate = client.read_deployment_by_name("evaluate-champion/evaluate-champion")
    assert evaluate.entrypoint == "flows/champion.py:champion_evaluation" and evaluate.enforce_parameter_schema
    sweep = client.read_deployment_by_name("sweep-pipeline/sweep-on-demand")
    assert sweep.entrypoint == "flows/sweep.py:sweep_pipeline" and sweep.enforce_parameter_schema
    assert set(sweep.parameter_openapi_schema["properties"]) == {"base", "sweep"}


@on_postgresql_too
def test_parameter_schema_rejects_a_bad_config_before_any_worker(deployed: str, client: SyncPrefectClient) -> None:
    deployment = client.read_deployment_by_name(ON_DEMAND)
    with pytest.raises(PrefectHTTPStatusError, match="epochs"):
        client.create_flow_run_from_deployment(deployment.id, parameters={"config": {"training": {"epochs": 0}}})


@pytest.fixture(scope="module")
def first_run(
    deployed: str, alerts: str, server: PrefectServer, client: SyncPrefectClient, run_config: dict[str, Any]
) -> FlowRun:
    flow_run_id = trigger(server, ON_DEMAND, run_config)
    return run_to_end(server, client, flow_run_id, server.home / "worker-1.log")


@on_postgresql_too
def test_on_demand_run_completes_with_artifacts_and_logs(
    first_run: FlowRun, client: SyncPrefectClient, server: PrefectServer, run_config: dict[str, Any]
) -> None:
    assert first_run.state.is_completed(), (
        f"{first_run.state.name}: {first_run.state.message}\n{(server.home / 'worker-1.log').read_text()[-3000:]}"
    )
    assert first_run.name.startswith("train-tiny-tudui-")
    assert {"visionflow", "on-demand"} <= set(first_run.tags)
    assert set(RUN_KEYS) <= artifact_keys(client, first_run.id, *RUN_KEYS)
    assert any("champion" in message for message in logs_of(client, first_run.id, "champion"))
    manifest = manifest_of(run_config, first_run)
    assert manifest["status"] == "completed" and manifest["prefect_flow_run_id"] == str(first_run.id)
    assert (manifest["champion"]["outcome"], manifest["champion"]["reason"]) == (
        "promoted",
        "no champion in the slot yet",
    )
    slot = Path(run_config["output"]["output_dir"]) / "models" / SLOT
    assert json.loads((slot / "manifest.json").read_text())["run_name"] == first_run.name


@on_postgresql_too
def test_rerun_on_unchanged_data_is_cached_and_keeps_the_champion(
    first_run: FlowRun, server: PrefectServer, client: SyncPrefectClient, run_config: dict[str, Any]
) -> None:
    second = run_to_end(server, client, trigger(server, ON_DEMAND, run_config), server.home / "worker-2.log")
    assert second.state.is_completed(), f"{second.state.name}: {second.state.message}"
    manifest = manifest_of(run_config, second)
    assert manifest["tasks"]["train_model"] == "cached"
    task_runs = task_runs_of(client, second.id, manifest["tasks"])
    assert {run.state.name for run in task_runs if task_name(run) == "train_model"} == {"Cached"}
    assert all({f"dataset:{run_config['data']['dataset']}", "model:tudui"} <= set(run.tags) for run in task_runs)
    decision = manifest["champion"]
    assert (decision["outcome"], decision["reason"]) == ("kept", "same weights")
    assert decision["champion_run"] == first_run.name
    assert decision["challenger_score"] == decision["champion_score"] == manifest["metrics"]["eval_accuracy"]
    assert "champion-decision" in artifact_keys(client, second.id, "champion-decision")


def test_evaluate_champion_scores_the_promoted_model(
    first_run: FlowRun, server: PrefectServer, client: SyncPrefectClient, run_config: dict[str, Any]
) -> None:
    scored = run_to_end(
        server,
        client,
        trigger(server, "evaluate-champion/evaluate-champion", run_config),
        server.home / "worker-evaluate.log",
    )
    assert scored.state.is_completed(), f"{scored.state.name}: {scored.state.message}"
    assert scored.name.startswith(f"evaluate-{SLOT}-")
    assert "champion-evaluation" in artifact_keys(client, scored.id, "champion-evaluation")
    accuracy = f"champion '{SLOT}' ({first_run.name}): accuracy"
    assert any(accuracy in message for message in logs_of(client, scored.id, accuracy))


@pytest.fixture(scope="module")
def failed_run(
    alerts: str,
    server: PrefectServer,
    client: SyncPrefectClient,
    run_config: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[FlowRun, Path]:
    """An on-demand run of a dataset that does not exist, and that dataset's path."""
    missing = tmp_path_factory.mktemp("failing") / "no-such-dataset"
    config = {**run_config, "data": {**run_config["data"], "dataset": str(missing)}}
    return run_to_end(server, client, trigger(server, ON_DEMAND, config), server.home / "worker-3.log"), missing


@on_postgresql_too
def test_failed_run_is_failed_with_the_reason(failed_run: tuple[FlowRun, Path], client: SyncPrefectClient) -> None:
    failed, missing = failed_run
    assert failed.state.is_failed()
    assert str(missing) in failed.state.message
    assert any(str(missing) in message for message in logs_of(client, failed.id, str(missing)))
    # The download step is the retryable one: 1 try + 2 retries before the run fails.
    task_runs = task_runs_of(client, failed.id, ["download_dataset"])
    assert [(run.state.name, run.run_count) for run in task_runs if task_name(run) == "download_dataset"] == [
        ("Failed", 3)
    ]


@on_postgresql_too
def test_failed_run_alert_reaches_the_webhook(failed_run: tuple[FlowRun, Path], webhook: WebhookReceiver) -> None:
    """automations.yaml's visionflow-run-failed, fired by the server's triggers service, POSTs
    through the Custom Webhook block to the receiver in this process."""
    failed, missing = failed_run
    alert = webhook.received(failed.name, "Failed", timeout=RECORD_SECONDS)
    assert alert["subject"] == f"visionflow: train-on-demand run {failed.name} Failed"
    assert f"Deployment: train-pipeline/train-on-demand\nFlow run: {failed.name} ({failed.id})" in alert["body"]
    assert f"Message: {failed.state.message}" in alert["body"] and str(missing) in alert["body"]


@on_postgresql_too
def test_champion_promotion_alert_reaches_the_webhook(
    first_run: FlowRun, webhook: WebhookReceiver, run_config: dict[str, Any]
) -> None:
    alert = webhook.received(f"new champion in '{SLOT}'", timeout=RECORD_SECONDS)
    assert alert["subject"] == f"visionflow: new champion in '{SLOT}': {first_run.name}"
    assert "Replaces: nobody (the slot was empty)" in alert["body"]
    assert f"Flow run: {first_run.name} ({first_run.id}), deployment train-on-demand" in alert["body"]
    # Only promotions notify: the cached rerun kept the champion (test above), so one alert.
    assert sum("new champion" in body.get("subject", "") for body in webhook.bodies) == 1


@contextmanager
def window_cut(
    server: PrefectServer, webhook: WebhookReceiver, tmp_path: Path, name: str, seconds: int
) -> Iterator[None]:
    """The automation `name` of automations.yaml applied over the module's one with its trigger's
    window cut to `seconds`; on exit the repository's file is applied again, which restores it."""
    document = yaml.safe_load(AUTOMATIONS_FILE.read_text())
    (entry,) = [entry for entry in document["automations"] if entry["name"] == name]
    short = tmp_path / "automations.yaml"
    short.write_text(yaml.safe_dump({"automations": [{**entry, "trigger": {**entry["trigger"], "within": seconds}}]}))
    apply = [sys.executable, "-m", "flows.cli", "alerts", "apply", "--webhook-url", webhook.url]
    assert f"updated {name}" in run_cli([*apply, "--file", str(short)], server.env, REPO)
    try:
        yield
    finally:
        restored = run_cli(apply, server.env, REPO)
        assert restored.count("updated visionflow-") == len(document["automations"]), restored


@on_postgresql_too
def test_missed_nightly_alert_fires_when_no_run_completes_in_the_window(
    alerts: str, server: PrefectServer, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    """visionflow-nightly-missing with its 26-hour window cut to 10 s (Prefect's minimum for a
    proactive trigger), applied over the module's one: no nightly-retrain run completes, so the
    server's proactive evaluation fires it. Applying the repository's file again restores it."""
    with window_cut(server, webhook, tmp_path, "visionflow-nightly-missing", seconds=10):
        alert = webhook.received("no completed nightly-retrain run", timeout=RECORD_SECONDS)
    assert alert["subject"] == "visionflow: no completed nightly-retrain run for 26 hours"
    assert "train-pipeline/nightly-retrain has had no Completed flow run" in alert["body"]


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"Chromium not installed at {CHROMIUM} (.ci/run installs it)")
def test_ui_shows_the_runs_artifacts(first_run: FlowRun, server: PrefectServer, tmp_path: Path) -> None:
    decision = f"Champion '{SLOT}': challenger promoted"  # the champion-decision artifact's description
    text = chromium_text(
        f"{server.url}/runs/flow-run/{first_run.id}",
        tmp_path / "chromium-profile",
        click_tab="Artifacts",
        expect=(first_run.name, "Completed", *RUN_KEYS, decision),
    )
    assert first_run.name in text and "Completed" in text
    for key in RUN_KEYS:
        assert key in text, f"artifact {key} not shown on the flow run page; page text:\n{text[:3000]}"
    assert decision in text


def ended(client: SyncPrefectClient, flow_run_id: UUID, timeout: float, log: Path) -> FlowRun:
    """The flow run, once it is in a final state (failing the test with the worker's log after `timeout` s)."""
    return wait_for(
        lambda: client.read_flow_run(flow_run_id),
        lambda run: run.state is not None and run.state.is_final(),
        timeout,
        lambda run: f"flow run {flow_run_id} still {run.state}:\n{tail(log)}",
    )


def test_cancelling_a_run_stops_it_cleanly_and_the_worker_takes_the_next(
    deployed: str, server: PrefectServer, client: SyncPrefectClient, run_config: dict[str, Any], tmp_path: Path
) -> None:
    """Cancel (as the UI's Cancel button does: state Cancelling) a run while a long-running worker
    trains it: the worker stops the flow-run process, the run ends Cancelled with its manifest
    `cancelled`, and the same worker then takes the rerun, which resumes from last.pt."""
    config = {
        **run_config,
        "training": {**run_config["training"], "epochs": 60},  # ~20 s in a worker; cancelled within ~1 s
        "output": {"output_dir": str(tmp_path / "out"), "run_name": "cancel-me"},
    }
    run_dir = tmp_path / "out" / "runs" / "cancel-me"
    last = run_dir / "checkpoints" / "last.pt"
    worker = [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1",
              "--name", "test-long-worker", "--install-policy", "never"]  # fmt: skip
    log = server.home / "worker-cancel.log"
    with background(worker, server.env, REPO, log) as process:
        first = trigger(server, ON_DEMAND, config)
        wait_for(lambda: last.exists(), bool, RUN_SECONDS, lambda _: f"no checkpoint of {first}:\n{tail(log)}")
        client.set_flow_run_state(first, Cancelling(message="cancelled by the test"), force=True)
        cancelled = ended(client, first, RECORD_SECONDS, log)
        assert cancelled.state.is_cancelled(), f"{cancelled.state}:\n{tail(log)}"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "cancelled" and "SIGTERM" in manifest["error"], manifest["error"]
        epoch = load_checkpoint(last)["epoch"]
        assert 0 < epoch < 60

        assert process.poll() is None, f"the worker exited:\n{tail(log)}"
        rerun = trigger(server, ON_DEMAND, config)  # the same worker takes it
        resumed = ended(client, rerun, RUN_SECONDS, log)
    assert resumed.state.is_completed(), f"{resumed.state}:\n{tail(log)}"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["resumed_from"] == str(last.resolve())
    assert manifest["prefect_flow_run_id"] == str(rerun)


def test_crashed_run_is_retried_automatically_and_resumes_to_the_same_weights(
    alerts: str,
    server: PrefectServer,
    client: SyncPrefectClient,
    run_config: dict[str, Any],
    webhook: WebhookReceiver,
    tmp_path: Path,
) -> None:
    """kill -9 of a flow-run process after its first checkpoint: the worker reports the run
    Crashed and visionflow-run-failed alerts. Nobody retries it: automations.yaml's
    visionflow-crash-retry schedules the same flow run again once it has stayed Crashed a minute,
    the same worker takes it, and it resumes from last.pt in the same run directory (keyed on the
    flow run) to the weights of an uninterrupted run."""
    epochs = 10  # 9 epochs (>= 0.3 s each) left when it is killed, within ~0.1 s of the first checkpoint
    config = {
        **run_config,
        "training": {**run_config["training"], "epochs": epochs},
        "output": {"output_dir": str(tmp_path / "out")},
    }
    runs = tmp_path / "out" / "runs"
    worker = [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1",
              "--name", "test-crash-worker", "--install-policy", "never"]  # fmt: skip
    log = server.home / "worker-crash.log"
    with background(worker, server.env, REPO, log) as process:
        flow_run_id = trigger(server, ON_DEMAND, config)
        last = wait_for(
            lambda: next(runs.glob("*/checkpoints/last.pt"), None),
            lambda found: found is not None,
            RUN_SECONDS,
            lambda _: f"no checkpoint of {flow_run_id}:\n{tail(log)}",
            interval=0.05,
        )
        pids = processes_with_env(process.pid, "PREFECT__FLOW_RUN_ID", str(flow_run_id))
        assert pids, f"no process of flow run {flow_run_id} under the worker:\n{tail(log)}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)  # no cleanup: the manifest still says running
        reached = load_checkpoint(last)["epoch"]
        assert 0 < reached < epochs
        crashed = ended(client, flow_run_id, RECORD_SECONDS, log)
        assert crashed.state.is_crashed(), f"{crashed.state}:\n{tail(log)}"
        resumed = wait_for(
            lambda: client.read_flow_run(flow_run_id),
            lambda run: run.state is not None and run.state.is_final() and not run.state.is_crashed(),
            RETRY_SECONDS + RUN_SECONDS,
            lambda run: f"flow run {flow_run_id} still {run.state} (not retried?):\n{tail(log)}",
        )
        assert resumed.state.is_completed(), f"{resumed.state}:\n{tail(log)}"
        fresh = {**config, "output": {"output_dir": str(tmp_path / "fresh")}}
        uninterrupted = ended(client, trigger(server, ON_DEMAND, fresh), RUN_SECONDS, log)
    assert uninterrupted.state.is_completed(), f"{uninterrupted.state}"

    history = client.read_flow_run_states(flow_run_id)
    names = [state.name for state in history]
    after_crash = names[names.index("Crashed") :]  # crashed once, rescheduled by the automation, then ran to the end
    assert after_crash[:2] == ["Crashed", "AwaitingRetry"] and after_crash[-1] == "Completed", names
    assert after_crash.count("Crashed") == 1 and resumed.run_count == 2, names
    assert [state.message for state in history if state.name == "AwaitingRetry"] == [RETRIED_BY]
    assert [run_dir.name for run_dir in runs.iterdir()] == [resumed.name]  # the same directory, reopened
    manifest = manifest_of(config, resumed)
    assert manifest["status"] == "completed" and manifest["prefect_flow_run_id"] == str(flow_run_id)
    assert manifest["resumed_from"] == str(last.resolve())
    assert manifest["weights_sha256"] == manifest_of(fresh, uninterrupted)["weights_sha256"]
    alert = webhook.received(resumed.name, "Crashed", timeout=RECORD_SECONDS)
    assert alert["subject"] == f"visionflow: train-on-demand run {resumed.name} Crashed"
    assert "Attempt 1. A Crashed run is scheduled again automatically" in alert["body"]
    assert f"prefect flow-run retry {flow_run_id}" in alert["body"]


def test_a_retry_that_crashes_before_its_flow_starts_is_failed_not_retried_again(
    alerts: str, server: PrefectServer, client: SyncPrefectClient, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    """The bounds of the automatic retry. Through the API, the states a worker reports for three
    evaluate-champion runs (a deployment without a concurrency limit; no worker takes them):
    `looping` crashed on attempt 1, was scheduled again and crashed again before its flow started
    (the run count still 1); `exhausted` crashed on attempt 3; `control` crashed on attempt 1,
    last. visionflow-crash-loop marks `looping` Failed at its second crash, and
    visionflow-crash-retry (its window cut to 20 s) schedules `control` again, but neither
    `looping` nor `exhausted`."""
    deployment = client.read_deployment_by_name("evaluate-champion/evaluate-champion")
    looping, exhausted, control = (
        client.create_flow_run_from_deployment(deployment.id, state=Pending()).id for _ in "abc"
    )
    try:
        with window_cut(server, webhook, tmp_path, "visionflow-crash-retry", seconds=20):  # crash-loop acts well within
            for run_id in (looping, exhausted, control):
                client.set_flow_run_state(run_id, Running(), force=True)  # attempt 1 starts its flow
            client.set_flow_run_state(looping, Crashed(message="killed by the test"), force=True)
            for state in (Scheduled(name="AwaitingRetry"), Pending(), Crashed(message="did not start")):
                client.set_flow_run_state(looping, state, force=True)
            for state in (Pending(), Running(), Pending(), Running(), Crashed(message="killed by the test")):
                client.set_flow_run_state(exhausted, state, force=True)  # attempts 2 and 3, then a crash
            client.set_flow_run_state(control, Crashed(message="killed by the test"), force=True)
            retried = wait_for(
                lambda: client.read_flow_run(control),
                lambda run: run.state is not None and run.state.name == "AwaitingRetry",
                RETRY_SECONDS,
                lambda run: f"control run {control} still {run.state}, not retried by visionflow-crash-retry",
            )
        assert retried.state.message == RETRIED_BY
        failed = wait_for(  # crash-loop acts on its own events: wait for it, not for crash-retry's
            lambda: client.read_flow_run(looping),
            lambda run: run.state is not None and run.state.is_final() and not run.state.is_crashed(),
            RECORD_SECONDS,
            lambda run: f"looping run {looping} still {run.state}, not marked by visionflow-crash-loop",
        )
        assert failed.state.is_failed() and failed.run_count == 1, failed.state
        assert failed.state.message.startswith("Crashed again before its flow started"), failed.state.message
        names = [state.name for state in client.read_flow_run_states(looping)]
        assert names[-6:] == ["Running", "Crashed", "AwaitingRetry", "Pending", "Crashed", "Failed"], names
        left = client.read_flow_run(exhausted)
        assert left.state.is_crashed() and left.run_count == 3, left.state
        alert = webhook.received(failed.name, "Failed", timeout=RECORD_SECONDS)
        assert "Crashed again before its flow started" in alert["body"]
        assert "Attempt 3. " in webhook.received(left.name, "Crashed", timeout=RECORD_SECONDS)["body"]
    finally:
        for run_id in (looping, exhausted, control):  # no later worker of this module takes them
            client.delete_flow_run(run_id)
