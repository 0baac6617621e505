"""automations.yaml against Prefect's own automation models, and `visionflow alerts apply` on the
session's temporary Prefect API. That the alerts really fire on a server is tested in
tests/flows/test_server.py (a failing deployment run, a champion promotion)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.server.events.schemas.automations import AutomationCore as ServerAutomation
from prefect.settings import PREFECT_API_URL

from flows.alerts import AUTOMATIONS_FILE, WEBHOOK_BLOCK, WEBHOOK_URL_ENV, load_automations
from flows.cli import main
from tasks.champion import KEPT_EVENT, PROMOTED_EVENT
from visionflow.errors import ConfigError

NAMES = [
    "visionflow-run-failed",
    "visionflow-crash-retry",
    "visionflow-crash-loop",
    "visionflow-nightly-missing",
    "visionflow-champion-promoted",
    "visionflow-champion-kept",
]


def test_automations_file_is_valid_for_prefects_client_and_server_models() -> None:
    """A Prefect upgrade that changes the automation schema fails here, not on a server at night."""
    block = uuid4()
    automations = load_automations(AUTOMATIONS_FILE, block)
    assert [automation.name for automation in automations] == NAMES
    for automation in automations:
        # The server's model also compiles the Jinja subjects and bodies.
        ServerAutomation.model_validate(automation.model_dump(mode="json"))
    failed, retry, loop, missing, promoted, kept = automations
    for alert in (failed, missing, promoted, kept):
        assert [(type(action), action.block_document_id) for action in alert.actions] == [(SendNotification, block)]
    # A crash is retried once the worker's second crash report is past, on attempts 1 and 2 only.
    assert retry.trigger.posture == "Proactive" and retry.trigger.within == timedelta(seconds=60)
    assert retry.trigger.after == {"prefect.flow-run.Crashed"} and retry.trigger.for_each == {"prefect.resource.id"}
    assert retry.trigger.match.root["prefect.run-count"] == ["1", "2"]
    assert [(type(action), action.state, action.name) for action in retry.actions] == [
        (ChangeFlowRunState, StateType.SCHEDULED, "AwaitingRetry")
    ]
    # A second crash at the same attempt count (a retry that never started its flow) ends the run.
    assert loop.trigger.posture == "Reactive" and loop.trigger.threshold == 2
    assert loop.trigger.for_each == {"prefect.resource.id", "prefect.run-count"}
    assert [(type(action), action.state) for action in loop.actions] == [(ChangeFlowRunState, StateType.FAILED)]
    for automation in (failed, retry, loop):  # runs of visionflow deployments only
        assert automation.trigger.match_related == failed.trigger.match_related
    assert failed.trigger.posture == "Reactive"
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}
    missing, promoted, kept = missing.trigger, promoted.trigger, kept.trigger
    assert missing.posture == "Proactive" and missing.within == timedelta(hours=26)
    assert missing.expect == {"prefect.flow-run.Completed"}
    assert missing.match_related.root == {
        "prefect.resource.role": "deployment",
        "prefect.resource.name": "nightly-retrain",
    }
    assert promoted.expect == {PROMOTED_EVENT} and kept.expect == {KEPT_EVENT}
    for champion in (promoted, kept):  # any slot's decision: its resource is visionflow.champion.<slot>
        assert champion.posture == "Reactive" and champion.match.root == {
            "prefect.resource.id": "visionflow.champion.*"
        }


def test_a_broken_automations_file_is_a_one_line_error(tmp_path: Path) -> None:
    broken = tmp_path / "automations.yaml"
    broken.write_text(
        "automations:\n  - name: x\n    trigger: {type: event, posture: Sideways}\n"
        "    actions: [{type: send-notification, body: hi}]\n"
    )
    with pytest.raises(ConfigError, match=r"Automation 'x' in '.*' is not a Prefect automation: trigger") as raised:
        load_automations(broken, uuid4())
    assert "\n" not in str(raised.value)
    broken.write_text("automations: []\n")
    with pytest.raises(ConfigError, match="no `automations:` list"):
        load_automations(broken, uuid4())


def test_alerts_apply_needs_a_webhook_or_a_block(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(WEBHOOK_URL_ENV, raising=False)
    assert main(["alerts", "apply"]) == 2
    assert capsys.readouterr().err == f"error: give --webhook-url URL (or set {WEBHOOK_URL_ENV}) or --block TYPE/NAME\n"
    assert main(["alerts", "apply", "--webhook-url", "http://x", "--block", "slack-webhook/a"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_harness")
def test_alerts_apply_twice_leaves_one_of_each_updated_in_place(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.setenv(WEBHOOK_URL_ENV, "http://127.0.0.1:9/first")
    with get_client(sync_client=True) as client:
        for name in NAMES:  # a leftover from an earlier apply by hand: replaced, not kept beside
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)
        assert main(["alerts", "apply"]) == 0
        first = capsys.readouterr().out
        assert all(f"created {name}" in first for name in NAMES), first
        ids = {name: client.read_automations_by_name(name)[0].id for name in NAMES}
        duplicate = load_automations(AUTOMATIONS_FILE, uuid4())[0]  # as `prefect automation create` run again
        client.create_automation(duplicate)

        assert main(["alerts", "apply", "--webhook-url", "http://127.0.0.1:9/second"]) == 0
        second = capsys.readouterr().out
        assert all(f"updated {name} ({ids[name]})" in second for name in NAMES), second
        block = client.read_block_document_by_name(WEBHOOK_BLOCK, "custom-webhook")
        assert block.data["url"] == "http://127.0.0.1:9/second"
        for name in NAMES:
            (automation,) = client.read_automations_by_name(name)
            assert automation.id == ids[name]
            notifying = [action for action in automation.actions if isinstance(action, SendNotification)]
            assert [action.block_document_id for action in notifying] == ([block.id] if notifying else [])

        assert main(["alerts", "apply", "--block", "slack-webhook/nobody"]) == 2
        assert "No block 'slack-webhook/nobody' on the Prefect server" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_harness")
def test_an_automation_the_server_refuses_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    broken = tmp_path / "automations.yaml"  # Prefect's client model takes it; the server compiles the template
    broken.write_text(
        "automations:\n  - name: visionflow-test-broken-template\n"
        "    trigger: {type: event, expect: [prefect.flow-run.Failed]}\n"
        "    actions: [{type: send-notification, body: '{{ flow_run.name '}]\n"
    )
    code = main(["alerts", "apply", "--file", str(broken), "--webhook-url", "http://127.0.0.1:9/hook"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: The Prefect server refused an automation of '{broken}': ")
    assert err.count("\n") == 1 and "template" in err
