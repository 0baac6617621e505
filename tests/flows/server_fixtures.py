"""A real Prefect server, CLI and process worker for tests, and headless Chromium on its UI.

Every process is started in its own session (process group). Teardown signals the group and
every descendant found in /proc (the process worker starts each flow run in a group of its
own), waits, then kills what is left, so nothing keeps running after a test, passed or failed.
While a server runs, SIGTERM to pytest (a CI timeout) raises KeyboardInterrupt so that this
teardown still runs, and each child is killed if pytest dies without any teardown (SIGKILL).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
CHROMIUM = "/usr/bin/chromium"
STOP_SECONDS = 20
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first found, grandchildren after), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM the process group and every descendant, wait, then SIGKILL whatever is left."""
    tree = _descendants(process.pid)
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _signal_all(tree, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=STOP_SECONDS)
    _signal_all([pid for pid in tree if Path(f"/proc/{pid}").exists()], signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when pytest dies (Linux prctl). Not SIGTERM: a
    worker stopping gracefully waits forever to flush events to a server that died with pytest."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextmanager
def background(args: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    """Run `args` in its own session with output to `log`; stopped (with its descendants) on exit."""
    with open(log, "ab") as out:
        process = subprocess.Popen(list(args), env=dict(env), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_die_with_parent)
    try:
        yield process
    finally:
        stop_process(process)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def run_cli(args: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float = 120) -> str:
    """Run a command in `cwd` to completion (in its own session, stopped on timeout) with PWD set
    as a shell would (prefect.yaml's `{{ $PWD }}`); fail the test with its output."""
    log = Path(env["PREFECT_HOME"]) / "cli.log"
    log.write_bytes(b"")
    with background(args, {**env, "PWD": str(cwd)}, cwd, log) as process:
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(args)} did not finish within {timeout}s:\n{tail(log)}")
    output = log.read_text(errors="replace")
    if code != 0:
        pytest.fail(f"{' '.join(args)} exited with {code}:\n{output[-4000:]}")
    return output


@dataclass(frozen=True)
class PrefectServer:
    url: str  # the UI; the API is at url + "/api"
    env: dict[str, str]  # the environment for clients and workers of this server
    home: Path
    log: Path

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"


def isolated_env(home: Path, api_url: str) -> dict[str, str]:
    """This environment without any PREFECT_* setting, plus a private PREFECT_HOME and the API URL."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=api_url, PREFECT_CLI_PROMPT="false", PYTHONUNBUFFERED="1")
    return env


def wait_healthy(api_url: str, process: subprocess.Popen, log: Path, timeout: float) -> float:
    """Poll GET /api/health until it answers true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            pytest.fail(f"prefect server exited with {process.returncode} before it was healthy:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if json.loads(response.read()) is True:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy at {api_url}/health after {timeout}s:\n{tail(log)}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def prefect_server(root: Path, timeout: float = 120) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1:<free port> with SQLite under `root`; stopped on exit."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _started_server(root, timeout) as server:
            yield server
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _started_server(root: Path, timeout: float) -> Iterator[PrefectServer]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = root / "prefect-home"
    home.mkdir(parents=True)
    env = isolated_env(home, f"{url}/api")
    log = root / "server.log"
    with background([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, root, log) as process:
        wait_healthy(f"{url}/api", process, log, timeout)
        yield PrefectServer(url=url, env=env, home=home, log=log)


def run_worker_once(server: PrefectServer, pool: str, cwd: Path, log: Path, timeout: float = 240) -> None:
    """`prefect worker start --run-once --limit 1`: take the runs due now, run them, return when they end."""
    args = [PREFECT, "worker", "start", "--pool", pool, "--type", "process", "--run-once", "--limit", "1",
            "--name", f"test-worker-{os.getpid()}", "--install-policy", "never"]
    with background(args, server.env, cwd, log) as process:
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not finish its run within {timeout}s:\n{tail(log)}")
    if code != 0:
        pytest.fail(f"worker exited with {code}:\n{tail(log)}")


def chromium_text(url: str, profile: Path, click_tab: str, expect: Sequence[str], timeout: float = 60) -> str:
    """Open `url` in headless Chromium, click the tab labelled `click_tab` once the page shows it,
    and return the page's text as soon as it contains every string of `expect` (or at timeout).

    Driven over the DevTools protocol rather than `--dump-dom`: the flow-run page drops a
    `?tab=Artifacts` deep link (the tab is hidden until the run has loaded), and its artifact
    list renders only inside the viewport, hence the tall window."""
    from websockets.sync.client import connect

    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
            "--window-size=1280,4000", "--remote-debugging-port=0", "about:blank"]
    log = profile.parent / "chromium.log"
    profile.mkdir(parents=True, exist_ok=True)
    with background(args, os.environ, profile, log):
        deadline = time.monotonic() + timeout
        while not (match := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read_text(errors="replace"))):
            if time.monotonic() > deadline:
                pytest.fail(f"chromium did not start:\n{tail(log)}")
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(1)}/json", timeout=10) as response:
            page = next(target for target in json.loads(response.read()) if target["type"] == "page")
        ids = itertools.count(1)
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as socket_:
            def call(method: str, **params: object) -> dict:
                request_id = next(ids)
                socket_.send(json.dumps({"id": request_id, "method": method, "params": params}))
                while True:
                    message = json.loads(socket_.recv(timeout=30))
                    if message.get("id") == request_id:
                        return message.get("result", {})

            def evaluate(expression: str) -> object:
                return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

            call("Page.navigate", url=url)
            click = (f"(() => {{ const tab = [...document.querySelectorAll('li.p-tab')]"
                     f".find(t => t.innerText.trim() === {json.dumps(click_tab)}); if (tab) tab.click(); return !!tab }})()")
            text = ""
            clicked = False
            while time.monotonic() < deadline:
                clicked = clicked or bool(evaluate(click))
                text = str(evaluate("document.body ? document.body.innerText : ''") or "")
                if clicked and all(item in text for item in expect):
                    break
                time.sleep(0.5)
            return text


def copy_tiny_dataset(source: Path, target: Path, classes: Sequence[str], train: int, val: int) -> Path:
    """`train`/`val` images per class from an ImageFolder tree with train/ and val/."""
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            (target / split / name).mkdir(parents=True)
            for image in sorted((source / split / name).iterdir())[:count]:
                shutil.copy(image, target / split / name / image.name)
    return target
