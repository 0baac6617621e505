"""A real Prefect server (on SQLite, or on a PostgreSQL cluster of its own), CLI and process
worker for tests, and headless Chromium on its UI (the processes are started with
tests/helpers.background).

Every process is started in its own session (process group). Teardown signals the group and
every descendant found in /proc (the process worker starts each flow run in a group of its
own), waits, then kills what is left, so nothing keeps running after a test, passed or failed.
While a server runs, SIGTERM to pytest (a CI timeout) raises KeyboardInterrupt so that this
teardown still runs, and each child is killed if pytest dies without any teardown (SIGKILL).
"""

from __future__ import annotations

import http.server
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import STOP_SECONDS, background, free_port, tail, wait_for

BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
CHROMIUM = "/usr/bin/chromium"


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
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=api_url,
        PREFECT_CLI_PROMPT="false",
        PYTHONUNBUFFERED="1",
    )
    return env


class PortTaken(Exception):
    """The server could not bind its port: another process took it after free_port() chose it."""


def _get_json(url: str) -> object:
    """The JSON answer of GET `url`, or None when nothing (valid) answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def wait_healthy(api_url: str, process: subprocess.Popen, log: Path, timeout: float, home: Path) -> float:
    """Poll until the server started as `process` answers at `api_url`: GET /health is true and
    GET /admin/settings has our PREFECT_HOME (a server of someone else's that took the port after
    free_port() chose it is healthy too); returns the seconds it took. Raises PortTaken when the
    process exited because the port was taken, fails the test on any other exit or at timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            if "already in use" in log.read_text(errors="replace"):
                raise PortTaken(tail(log))
            pytest.fail(f"prefect server exited with {process.returncode} before it was healthy:\n{tail(log)}")
        if _get_json(f"{api_url}/health") is True:
            settings = _get_json(f"{api_url}/admin/settings")
            if isinstance(settings, dict) and settings.get("home") == str(home) and process.poll() is None:
                return time.monotonic() - start
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy at {api_url}/health after {timeout}s:\n{tail(log)}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


SQLITE, POSTGRESQL = "sqlite", "postgresql"
DATABASES = (SQLITE, POSTGRESQL)
# Debian's `postgresql` package (.ci/run installs it) keeps initdb and postgres off PATH, in one
# folder per major version; the account it creates runs them when we are root (they refuse root).
POSTGRES_BIN_DIRS = Path("/usr/lib/postgresql")
POSTGRES_USER = "postgres"


def postgres_bin_dir() -> Path:
    """The bin folder of the newest PostgreSQL server installed, or else of the `initdb` on PATH;
    fails the test when there is none."""
    __tracebackhide__ = True
    installed = sorted(
        (initdb.parent for initdb in POSTGRES_BIN_DIRS.glob("*/bin/initdb")),
        key=lambda bin_dir: float(bin_dir.parent.name),
    )
    if installed:
        return installed[-1]
    if on_path := shutil.which("initdb"):
        return Path(on_path).parent
    pytest.fail(
        f"no PostgreSQL server: no initdb in {POSTGRES_BIN_DIRS}/*/bin or on PATH "
        "(.ci/run installs Debian's postgresql package: apt-get install postgresql)"
    )


@contextmanager
def postgres_database(log: Path, timeout: float = 60, attempts: int = 3) -> Iterator[str]:
    """A PostgreSQL cluster of its own, set up as docs/guides/operations.md's "Move to PostgreSQL" says: `initdb` in a
    temporary folder, `postgres` on 127.0.0.1:<free port>, a role and a database `prefect` that it
    owns, with the extension pg_trgm. Yields Prefect's connection URL for that database.

    The server runs as our child (killed if pytest dies, like every process of `background`), as
    the `postgres` user when we are root. On exit: a fast shutdown, then the folder is removed.
    Its output, initdb's before it, goes to `log`."""
    bin_dir = postgres_bin_dir()
    user = POSTGRES_USER if os.geteuid() == 0 else None
    # Not under pytest's temporary folder: that is private to our user, and postgres may be another.
    root = Path(tempfile.mkdtemp(prefix="visionflow-postgres-"))
    superuser, superuser_password, prefect_password = "postgres", secrets.token_hex(16), secrets.token_hex(16)
    try:
        password_file = root / "superuser-password"
        password_file.write_text(superuser_password)
        if user:
            shutil.chown(root, user, user)
            shutil.chown(password_file, user, user)
        data = root / "data"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", superuser, f"--pwfile={password_file}"]
        initdb += ["--auth=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-sync"]
        with background(initdb, os.environ, root, log, user=user) as process:
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"initdb did not finish within {timeout}s:\n{tail(log)}")
        if code != 0:
            pytest.fail(f"initdb exited with {code}:\n{tail(log)}")
        client_env = {**os.environ, "PGPASSWORD": superuser_password}
        for attempt in range(1, attempts + 1):
            port = free_port()
            # A throwaway cluster: nothing to keep after a crash, so no waiting for the disk.
            server = [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(root)]
            server += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
            start = log.stat().st_size
            with background(server, os.environ, root, log, user=user) as process:
                ready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-t", "2"]

                def readiness() -> int | None:
                    """pg_isready's exit status (0: accepting connections), None once postgres exited."""
                    return None if process.poll() is not None else subprocess.run(ready, timeout=10).returncode

                state = wait_for(
                    readiness,
                    lambda state: state in (None, 0),
                    timeout,
                    lambda state: f"postgres on port {port} not ready (pg_isready: {state}):\n{tail(log)}",
                )
                if state is None:
                    output = log.read_bytes()[start:].decode(errors="replace")
                    if "Address already in use" in output and attempt < attempts:
                        continue
                    pytest.fail(f"postgres exited with {process.returncode}:\n{tail(log)}")
                setup = f"""
                    CREATE ROLE prefect LOGIN PASSWORD '{prefect_password}';
                    CREATE DATABASE prefect OWNER prefect;
                    \\connect prefect
                    CREATE EXTENSION pg_trgm;
                """
                psql = [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", superuser]
                done = subprocess.run(
                    [*psql, "-d", "postgres", "-q", "-v", "ON_ERROR_STOP=1"],
                    input=setup,
                    env=client_env,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
                if done.returncode != 0:
                    pytest.fail(f"psql setting up the database exited with {done.returncode}:\n{done.stderr}")
                try:
                    yield f"postgresql+asyncpg://prefect:{prefect_password}@127.0.0.1:{port}/prefect"
                finally:
                    process.send_signal(signal.SIGINT)  # fast shutdown: ends the sessions, then stops
                    try:
                        process.wait(timeout=STOP_SECONDS)
                    except subprocess.TimeoutExpired:
                        pass  # background() kills it
            return
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def prefect_server(
    root: Path, database: str = SQLITE, timeout: float = 120, settings: Mapping[str, str] | None = None
) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1:<free port> with its database under `root`: SQLite, or
    PostgreSQL (a cluster of its own, `postgres_database`), with `settings` (PREFECT_* variables) in
    its environment and its clients'; stopped on exit."""
    if database not in DATABASES:
        raise ValueError(f"database {database!r}: expected one of {', '.join(DATABASES)}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with (
            postgres_database(root / "postgres.log") if database == POSTGRESQL else nullcontext() as database_url,
            _started_server(root, timeout, database_url, settings or {}) as server,
        ):
            yield server
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _started_server(
    root: Path, timeout: float, database_url: str | None, settings: Mapping[str, str], attempts: int = 3
) -> Iterator[PrefectServer]:
    home = root / "prefect-home"
    home.mkdir(parents=True)
    log = root / "server.log"
    for attempt in range(1, attempts + 1):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**isolated_env(home, f"{url}/api"), **settings}
        # The server's database; its clients do not need it (SQLite: PREFECT_HOME/prefect.db).
        database = {} if database_url is None else {"PREFECT_API_DATABASE_CONNECTION_URL": database_url}
        log.write_bytes(b"")
        with background(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], {**env, **database}, root, log
        ) as process:
            try:
                wait_healthy(f"{url}/api", process, log, timeout, home)
            except PortTaken as taken:
                if attempt == attempts:
                    pytest.fail(f"prefect server found its port taken {attempts} times:\n{taken}")
                continue
            yield PrefectServer(url=url, env=env, home=home, log=log)
            return


def run_worker_once(server: PrefectServer, pool: str, cwd: Path, log: Path, timeout: float = 240) -> None:
    """`prefect worker start --run-once --limit 1`: take the runs due now, run them, return when they end."""
    args = [
        PREFECT,
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "process",
        "--run-once",
        "--limit",
        "1",
        "--name",
        f"test-worker-{os.getpid()}",
        "--install-policy",
        "never",
    ]
    with background(args, server.env, cwd, log) as process:
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not finish its run within {timeout}s:\n{tail(log)}")
    if code != 0:
        pytest.fail(f"worker exited with {code}:\n{tail(log)}")


def _devtools_port(log: Path) -> int | None:
    match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def _page_targets(port: int) -> list[dict]:
    targets = _get_json(f"http://127.0.0.1:{port}/json")
    return [target for target in targets if target.get("type") == "page"] if isinstance(targets, list) else []


# One poll of the page: click the tab (again) while it is not the active one, report whether it
# is, and the page's text. The tab is hidden until the flow run has loaded, and a click made
# while the page is still (re)rendering can be lost, so it is re-clicked until it is active.
_PAGE_PROBE = """(() => {
  const tab = [...document.querySelectorAll('li.p-tab')].find(t => t.innerText.trim() === %s);
  const active = () => !!tab && tab.classList.contains('p-tab__active');
  if (tab && !active()) tab.click();
  return {tab: !!tab, active: active(), text: document.body ? document.body.innerText : ''};
})()"""


def chromium_text(url: str, profile: Path, click_tab: str, expect: Sequence[str], timeout: float = 120) -> str:
    """Open `url` in headless Chromium, click the tab labelled `click_tab` until it is the active
    one, and return the page's text as soon as that tab is active and the text contains every
    string of `expect`; fail the test, naming what is missing, when that has not happened within
    `timeout` seconds (Chromium's start included).

    Pass in `expect` every string the test asserts on the text: the page fills in over time (the
    run's state, the tab, each artifact card, and each card's description after its key, as the
    markdown renders), so any other string may not be there yet when the awaited ones are.

    Driven over the DevTools protocol rather than `--dump-dom`: the flow-run page drops a
    `?tab=Artifacts` deep link (the tab is hidden until the run has loaded), and its artifact
    list renders only inside the viewport, hence the tall window."""
    from websockets.sync.client import connect

    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,4000",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    log = profile.parent / "chromium.log"
    profile.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(deadline - time.monotonic(), 1.0)

    with background(args, os.environ, profile, log):
        port = wait_for(
            lambda: _devtools_port(log),
            lambda found: found is not None,
            left(),
            lambda _: f"chromium did not start (no DevTools port in its output):\n{tail(log)}",
        )
        pages = wait_for(
            lambda: _page_targets(port),
            bool,
            left(),
            lambda _: f"chromium on port {port} lists no page target:\n{tail(log)}",
        )
        ids = itertools.count(1)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as socket_:

            def call(method: str, **params: object) -> dict:
                """The result of one DevTools command ({} when it answered with an error)."""
                request_id = next(ids)
                socket_.send(json.dumps({"id": request_id, "method": method, "params": params}))
                while True:
                    message = json.loads(socket_.recv(timeout=min(30.0, left())))
                    if message.get("id") == request_id:
                        return message.get("result", {})

            def probe() -> dict:
                """The page's state; all empty while it has no document to evaluate in (navigating)."""
                result = call("Runtime.evaluate", expression=_PAGE_PROBE % json.dumps(click_tab), returnByValue=True)
                value = result.get("result", {}).get("value") if "exceptionDetails" not in result else None
                return value if isinstance(value, dict) else {"tab": False, "active": False, "text": ""}

            def shown(state: dict) -> bool:
                return state["active"] and all(item in state["text"] for item in expect)

            def missing(state: dict) -> str:
                absent = [item for item in expect if item not in state["text"]]
                where = (
                    "the tab is active"
                    if state["active"]
                    else "the tab is shown but not active"
                    if state["tab"]
                    else "no tab of that name on the page"
                )
                return f"{url}: tab {click_tab!r} ({where}) does not show {absent}; page text:\n{state['text'][:3000]}"

            call("Page.navigate", url=url)
            return wait_for(probe, shown, left(), missing)["text"]


class WebhookReceiver:
    """An HTTP server on 127.0.0.1:<free port>, in a thread of the test process, that records the
    JSON body of every POST (a notification block's webhook calls)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    received.append(json.loads(self.rfile.read(length)))
                except ValueError:
                    received.append({"unparsed": True})
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # no lines on stderr per request
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=STOP_SECONDS)

    def received(self, *texts: str, timeout: float) -> dict:
        """The first POST body whose subject and body together contain every one of `texts`;
        fails the test with what was received when none has after `timeout` seconds."""
        __tracebackhide__ = True

        def matching() -> dict | None:
            for body in list(self.bodies):
                text = f"{body.get('subject', '')}\n{body.get('body', '')}"
                if all(part in text for part in texts):
                    return body
            return None

        return wait_for(
            matching,
            lambda found: found is not None,
            timeout,
            lambda _: f"no webhook POST at {self.url} contains {list(texts)}; received: {self.bodies}",
        )
