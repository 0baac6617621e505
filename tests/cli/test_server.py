"""`visionflow server start|stop|status` with a real Prefect server (a temporary PREFECT_HOME, a
free port of 127.0.0.1), and the Prefect API `visionflow train` chooses: the running server, or
else a temporary one of its own, with one hint line.

Every command runs as a process of its own (in its own session, stopped at its timeout). The
background server outlives the `start` command that launched it, so it is no descendant of the
test: the teardown kills it by the pid its state file records, whether the test passed or not."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.prefect_server import (
    NOT_RUNNING_STATUS,
    START_TIMEOUT_S,
    STATE_FILE,
    STOP_TIMEOUT_S,
    TEMPORARY_SERVER_HINT,
)
from tests.helpers import REPO, background, copy_tiny_dataset, free_port, tail, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(300)]

TRAIN_SECONDS = 240  # a one-epoch run on a tiny dataset, with a temporary server's start
PORT_ATTEMPTS = 3


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A fresh Prefect home; whatever server its state file records is killed at teardown."""
    home = tmp_path / "prefect-home"
    yield home
    state = home / STATE_FILE
    if not state.exists():
        return
    pid = json.loads(state.read_text())["pid"]
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_for(lambda: alive(pid), lambda running: not running, 30, lambda _: f"server pid {pid} survived SIGKILL")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cli_env(home: Path) -> dict[str, str]:
    """This environment without any PREFECT_* setting (PREFECT_API_URL least of all), plus `home`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"
    )
    return env


def visionflow(home: Path, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run `visionflow ARGS` to completion with `home` as the Prefect home: its exit status and
    its output (stdout and stderr together)."""
    log = home.parent / "command.log"
    log.write_bytes(b"")
    with background([sys.executable, "-m", "flows.cli", *args], cli_env(home), home.parent, log) as process:
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"visionflow {' '.join(args)} did not finish within {timeout:.0f}s:\n{tail(log)}")
    return code, log.read_text(errors="replace")


def start_on_a_free_port(home: Path) -> tuple[int, str]:
    """`visionflow server start --port <a free port>` (another one if something took it meanwhile);
    the port and the output."""
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        code, output = visionflow(home, "server", "start", "--port", str(port), timeout=START_TIMEOUT_S + 30)
        if not (code == 2 and f"Port {port} " in output):
            assert code == 0, output
            return port, output
    pytest.fail(f"the port chosen was taken before the server started, {PORT_ATTEMPTS} times")


def train(home: Path, sample_dataset: Path, run_name: str) -> tuple[str, dict]:
    """A one-epoch `visionflow train` on a tiny dataset: its output and the run's manifest."""
    root = home.parent
    data = copy_tiny_dataset(sample_dataset, root / f"data-{run_name}", ("bird", "frog", "truck"), 6, 3)
    code, output = visionflow(
        home,
        "train",
        *("--dataset", str(data), "--epochs", "1", "--batch-size", "9", "--device", "cpu"),
        *("--output", str(root / "out"), "--run-name", run_name),
        timeout=TRAIN_SECONDS,
    )
    assert code == 0, output
    return output, json.loads((root / "out" / "runs" / run_name / "manifest.json").read_text())


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def port_in_use(port: int) -> bool:
    """Whether a server could not bind 127.0.0.1:`port` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_start_status_train_stop(home: Path, sample_dataset: Path) -> None:
    code, output = visionflow(home, "server", "status")
    assert code == NOT_RUNNING_STATUS and output.startswith("Prefect server not running"), output

    port, output = start_on_a_free_port(home)
    url = f"http://127.0.0.1:{port}"
    assert f"UI:   {url}\n" in output and f"API:  {url}/api\n" in output
    assert f"log:  {home / 'visionflow-server.log'}" in output
    assert get_json(f"{url}/api/health") is True
    pid = json.loads((home / STATE_FILE).read_text())["pid"]
    assert f"Prefect server started (pid {pid})" in output

    code, output = visionflow(home, "server", "start", "--port", str(port))
    assert code == 0 and f"Prefect server already running (pid {pid})\n  UI:   {url}\n" in output, output
    code, output = visionflow(home, "server", "status")
    assert code == 0 and f"Prefect server running (pid {pid})\n  UI:   {url}\n" in output, output

    # train uses the running server: no temporary one (its hint), the UI link opens the run there.
    output, manifest = train(home, sample_dataset, "on-the-server")
    assert TEMPORARY_SERVER_HINT not in output
    flow_run_id = manifest["prefect_flow_run_id"]
    assert f"Prefect UI:    {url}/runs/flow-run/{flow_run_id}\n" in output
    flow_run = get_json(f"{url}/api/flow_runs/{flow_run_id}")
    assert (flow_run["name"], flow_run["state_type"]) == ("on-the-server", "COMPLETED")

    code, output = visionflow(home, "server", "stop", timeout=2 * STOP_TIMEOUT_S + 30)
    assert code == 0 and output.startswith(f"Prefect server stopped (pid {pid}, {url}): it exited"), output
    assert not alive(pid) and not port_in_use(port)
    assert not (home / STATE_FILE).exists()
    code, output = visionflow(home, "server", "status")
    assert code == NOT_RUNNING_STATUS, output
    code, output = visionflow(home, "server", "stop")
    assert (code, output) == (0, "Prefect server not running\n")


def test_start_on_a_taken_port_is_a_one_line_error(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = visionflow(home, "server", "start", "--port", str(port))
    assert code == 2 and output.startswith("error: ") and output.count("\n") == 1, output
    assert f"Port {port} on 127.0.0.1 is already in use" in output
    assert not (home / STATE_FILE).exists()


def test_train_without_a_server_says_once_how_to_keep_one(home: Path, sample_dataset: Path) -> None:
    output, manifest = train(home, sample_dataset, "temporary")
    assert output.splitlines().count(TEMPORARY_SERVER_HINT) == 1
    ui_line = (
        "Prefect UI:    run `visionflow server start`, then open "
        f"http://127.0.0.1:4200/runs/flow-run/{manifest['prefect_flow_run_id']}\n"
    )
    assert ui_line in output
