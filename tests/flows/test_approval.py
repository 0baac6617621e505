"""Approval of a promotion (champion.approval manual): the flow run pauses with Prefect's own
pause and a form showing the gate's checks; an answer through the API approves (promoted) or
rejects (kept, the reason recorded), no answer in time keeps the champion with the run completed;
and once on a real `prefect server start`, a reviewer approves in the Prefect UI (headless Chromium).

The champion learned colours under shifted labels, the challenger the right ones: the challenger
clearly passes every check of the default gate, so each of its runs asks for a review."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.champion import DECISION_KEY
from tests.flows.server_fixtures import CHROMIUM, PrefectServer, _devtools_port, _page_targets, prefect_server, run_cli
from tests.helpers import artifact_data, background, cli_command, tail, tiny_config, train, wait_for
from visionflow.champion import read_champion
from visionflow.manifest import Manifest

COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128))  # one per class, easy to learn
CLASSES = ("red", "green", "blue", "gray")
EPOCHS = 3  # what tudui needs here to pass the default gate clearly (1.0 against 0.0 accuracy)
RUN_SECONDS = 180  # a flow run to its end (or its pause) on a busy 2-core machine
PAUSED = "Paused"
BOUNDED_REVIEW = {"approval": "manual", "approval_timeout_minutes": 3}  # answered at once; bounds a failing test


def colour_dataset(root: Path, shift: int) -> Path:
    """8 train and 4 val noisy 32 px images per class, class i in colour i + shift."""
    rng = np.random.default_rng(shift)
    for split, count in (("train", 8), ("val", 4)):
        for index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            colour = np.array(COLOURS[(index + shift) % len(COLOURS)])
            for image in range(count):
                pixels = np.clip(colour + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{image}.png")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The right and the shifted colours, and one output folder (its cached trainings) for the module."""
    root = tmp_path_factory.mktemp("approval")
    return {"right": colour_dataset(root / "right", 0), "shifted": colour_dataset(root / "shifted", 1), "out": root}


def config(work: dict[str, Path], data: str, slot: str, run_name: str, **overrides: Any) -> Any:
    values = {"output.champion": slot, "output.run_name": run_name, "training.epochs": EPOCHS, **overrides}
    return tiny_config(work[data], work["out"] / "out", **values)


def paused_run(client: Any, name: str) -> tuple[Any, str]:
    """The flow run named `name` once it is paused with its form saved, and the form's markdown
    (the RunInput's description). Prefect saves the form's schema, then its description, after
    the run is Paused, and the server refuses an answer until the schema is there."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.exceptions import PrefectHTTPStatusError

    def read() -> tuple[Any, str | None]:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        if not runs or runs[0].state is None or runs[0].state.name != PAUSED:
            return (runs[0] if runs else None), None
        try:
            keyset = runs[0].state.state_details.run_input_keyset
            return runs[0], client.read_flow_run_input(runs[0].id, keyset["description"])
        except PrefectHTTPStatusError as err:  # 404 until the description is saved
            if err.response.status_code != 404:
                raise
            return runs[0], None

    return wait_for(
        read,
        lambda found: found[1] is not None,
        RUN_SECONDS,
        lambda found: f"flow run {name} not {PAUSED} with its form: {found[0] and found[0].state}",
    )


def answer(client: Any, run: Any, approve: bool, reason: str) -> None:
    """Resume the paused run with an answer through the API (as the UI's form does)."""
    result = client.resume_flow_run(run.id, run_input={"approve": approve, "reason": reason})
    assert result.status.value == "ACCEPT", result


@contextmanager
def in_background(config: Any) -> Iterator[Future[dict[str, Any]]]:
    """The training flow run in a thread of this process, while the test answers its review (its
    review times out at BOUNDED_REVIEW: a failing test does not wait for ever on the thread)."""
    config = config.model_copy(update={"champion": config.champion.model_copy(update=BOUNDED_REVIEW)})
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(train, config)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("prefect_harness")
def test_a_review_through_the_api_rejects_times_out_and_approves(work: dict[str, Path]) -> None:
    from prefect.client.orchestration import get_client

    slot = "api"
    assert train(config(work, "shifted", slot, "champion-api"))["champion"]["promoted"]
    with get_client(sync_client=True) as client:
        with in_background(config(work, "right", slot, "rejected")) as done:
            run, form = paused_run(client, "rejected")
            assert "Promote run `rejected` into champion slot `api`?" in form, form
            for check in ("gain", "significance", "class recall", "class F1", "calibration"):
                assert f"| {check} | pass |" in form, form
            answer(client, run, False, "  eval set too small  ")
            rejected = done.result(timeout=RUN_SECONDS)["champion"]
        assert rejected["outcome"] == "kept" and rejected["review"] == "rejected: eval set too small"
        assert rejected["reason"] == "passed all 5 checks; rejected in review: eval set too small"
        assert read_champion(work["out"] / "out", slot).run_name == "champion-api"

        timeout = {"champion.approval": "manual", "champion.approval_timeout_minutes": 0.05}  # 3 s
        start = time.monotonic()
        manifest = train(config(work, "right", slot, "unanswered", **timeout))
        unanswered = manifest["champion"]
        assert time.monotonic() - start >= 3
        assert unanswered["outcome"] == "kept" and unanswered["review"] == "no answer within 0.05 minutes"
        assert manifest["status"] == "completed"
        assert client.read_flow_run(manifest["prefect_flow_run_id"]).state.name == "Completed"

        with in_background(config(work, "right", slot, "approved")) as done:
            answer(client, paused_run(client, "approved")[0], True, "ok")
            manifest = done.result(timeout=RUN_SECONDS)
        approved = manifest["champion"]
        assert approved["outcome"] == "promoted" and approved["review"] == "approved: ok"
        assert approved["reason"] == "passed all 5 checks"
        assert read_champion(work["out"] / "out", slot).run_name == "approved"
        assert "Review: approved: ok" in artifact_data(manifest["prefect_flow_run_id"], DECISION_KEY)


# One step of a review in the UI per call: open the Resume dialog, switch "Approve" on, type the
# reason (an input event, as typing sends), then report the dialog ready with its text. A click
# made while the page still renders can be lost, so each call redoes what is not done yet.
_REVIEW_STEP = """(() => {
  const reason = %s;
  const dialog = document.querySelector('.p-modal[role=dialog]');
  if (!dialog) {
    const resume = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Resume');
    if (resume) resume.click();
    return {stage: resume ? 'opening the dialog' : 'no Resume button yet', text: ''};
  }
  const approve = dialog.querySelector('[role=switch]'), box = dialog.querySelector('textarea');
  if (!approve || !box) return {stage: 'the form is loading', text: dialog.innerText};
  if (approve.getAttribute('aria-checked') !== 'true') {
    approve.click();
    return {stage: 'switching Approve on', text: dialog.innerText};
  }
  if (box.value !== reason) {
    box.value = reason;
    box.dispatchEvent(new Event('input', {bubbles: true}));
    return {stage: 'typing the reason', text: dialog.innerText};
  }
  return {stage: 'ready', text: dialog.innerText};
})()"""
_SUBMIT = "[...document.querySelectorAll('.p-modal__footer button')].find(b => b.innerText.trim() === 'Submit').click()"
_DIALOG_OPEN = "!!document.querySelector('.p-modal[role=dialog]')"


def approve_in_chromium(url: str, profile: Path, reason: str, expect: tuple[str, ...], timeout: float = 120) -> str:
    """Open the paused flow run's page `url` in headless Chromium, press Resume, switch Approve
    on, type `reason` and, once the dialog shows every string of `expect`, press Submit; returns
    the dialog's text once it has closed (the answer taken). Fails the test naming the step it was
    at after `timeout` seconds."""
    from websockets.sync.client import connect

    profile.mkdir(parents=True)
    log = profile.parent / "chromium.log"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    args += ["--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,2000", "--remote-debugging-port=0"]
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(deadline - time.monotonic(), 1.0)

    with background([*args, "about:blank"], os.environ, profile, log):
        port = wait_for(lambda: _devtools_port(log), bool, left(), lambda _: f"no DevTools port:\n{tail(log)}")
        pages = wait_for(lambda: _page_targets(port), bool, left(), lambda _: f"no page target:\n{tail(log)}")
        ids = itertools.count(1)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as socket_:

            def evaluate(expression: str) -> Any:
                request_id = next(ids)
                params = {"expression": expression, "returnByValue": True}
                socket_.send(json.dumps({"id": request_id, "method": "Runtime.evaluate", "params": params}))
                while True:
                    message = json.loads(socket_.recv(timeout=min(30.0, left())))
                    if message.get("id") == request_id:
                        return message.get("result", {}).get("result", {}).get("value")

            def step() -> dict:
                value = evaluate(_REVIEW_STEP % json.dumps(reason))
                return value if isinstance(value, dict) else {"stage": "navigating", "text": ""}

            socket_.send(json.dumps({"id": next(ids), "method": "Page.navigate", "params": {"url": url}}))
            ready = wait_for(
                step,
                lambda state: state["stage"] == "ready" and all(item in state["text"] for item in expect),
                left(),
                lambda state: (
                    f"{url}: {state['stage']}; missing {[i for i in expect if i not in state['text']]}:\n"
                    f"{state['text'][:3000]}"
                ),
            )
            evaluate(_SUBMIT)  # the dialog closes once the server took the answer: Chromium stays till then
            wait_for(
                lambda: evaluate(_DIALOG_OPEN),
                lambda open_: open_ is False,
                left(),
                lambda _: f"{url}: the Resume dialog is still open after Submit",
            )
            return ready["text"]


@pytest.fixture(scope="module")
def server(work: dict[str, Path]) -> Iterator[PrefectServer]:
    with prefect_server(work["out"] / "server") as running:
        yield running


def write_config(path: Path, config: Any) -> str:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_reviewer_approves_in_the_prefect_ui(work: dict[str, Path], server: PrefectServer) -> None:
    from prefect.client.orchestration import SyncPrefectClient

    slot, root = "ui", work["out"]
    champion = write_config(root / "champion.yaml", config(work, "shifted", slot, "champion-ui"))
    run_cli([*cli_command(), "train", "--config", champion], server.env, root, timeout=RUN_SECONDS)
    manual = config(work, "right", slot, "reviewed-in-ui", **{"champion.approval": "manual"})
    log = root / "reviewed-in-ui.log"
    with (
        background(
            [*cli_command(), "train", "--config", write_config(root / "manual.yaml", manual)], server.env, root, log
        ) as process,
        SyncPrefectClient(server.api_url) as client,
    ):
        run, _ = paused_run(client, "reviewed-in-ui")
        text = approve_in_chromium(
            f"{server.url}/runs/flow-run/{run.id}",
            root / "chromium-profile",
            "colours right",
            ("Promote run reviewed-in-ui into champion slot ui?", "significance", "calibration", "Approve"),
        )
        assert "passed all 5 checks" in text
        try:
            assert process.wait(timeout=RUN_SECONDS) == 0, tail(log)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the approved run did not end within {RUN_SECONDS}s:\n{tail(log)}")
    decision = Manifest.load(root / "out" / "runs" / "reviewed-in-ui").champion
    assert decision.promoted and decision.review == "approved: colours right", decision
    assert read_champion(root / "out", slot).run_name == "reviewed-in-ui"
