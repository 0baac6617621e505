"""Which Prefect API a visionflow command talks to, and `visionflow server`: Prefect's own server
(`prefect server start`, its public CLI) kept running in the background on 127.0.0.1.

Nothing here imports Prefect: a command chooses its API before it imports Prefect, which reads
PREFECT_API_URL once, at import.

Every server visionflow starts keeps the leases of concurrency slots (the device limits a training
holds, tasks/training.py) in the Prefect home, not in its memory (`LEASE_STORAGE`): a server
restarted while a training held a slot, or another temporary server of the same home, still finds
that lease and frees the slot when it expires, instead of leaving it taken forever. A setting of
your own wins.

The background server is not `prefect server start --background`: in Prefect 3.9 that sends the
server's output to a pipe nobody reads (no log, and writes to a closed pipe once the starting
command has exited), records only a pid in `server.pid` (not the port, so nothing can tell where
it listens) and `prefect server stop` signals it without waiting for it to exit. So `visionflow
server start` runs `prefect server start` itself, in its own session, with its output in a log
file and its pid and port in a small JSON file, both in the Prefect home beside the database.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks.prefect_compat import LEASE_STORAGE
from visionflow.errors import ConfigError
from visionflow.fileio import atomic_write_json, locked
from visionflow.train.stopping import parent_death_signal

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
STATE_FILE = "visionflow-server.json"  # in the Prefect home: {"pid": ..., "port": ...}
LOG_FILE = "visionflow-server.log"
LOCK_FILE = "visionflow-server.lock"  # held while a start or stop is under way
START_TIMEOUT_S = 120.0  # a first start creates the database and builds the UI
STOP_TIMEOUT_S = 30.0  # after SIGTERM; then SIGKILL
ANSWER_TIMEOUT_S = 2.0  # one request to a server that should be up
POLL_S = 0.1
NOT_RUNNING_STATUS = 3  # exit status of `visionflow server status` when no server answers
TEMPORARY_SERVER_HINT = (
    "hint: this command starts a temporary Prefect server and stops it at exit; "
    "`visionflow server start` keeps one running, so later runs start faster and the Prefect UI stays up"
)


def prefect_home() -> Path:
    """The Prefect home, as Prefect resolves it from the environment: PREFECT_HOME, else ~/.prefect."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser().resolve()


def server_url(port: int) -> str:
    """The UI of a server on 127.0.0.1:`port` (its API is this plus /api)."""
    return f"http://{HOST}:{port}"


@dataclass(frozen=True)
class BackgroundServer:
    """A `visionflow server` as recorded in the Prefect home's state file."""

    home: Path
    pid: int
    port: int

    @property
    def url(self) -> str:
        return server_url(self.port)

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log(self) -> Path:
        return self.home / LOG_FILE

    def answers(self) -> bool:
        """Whether this server answers: its API is healthy and serves this Prefect home (not some
        other server that took the port after this one died)."""
        if get_json(f"{self.api_url}/health") is not True:
            return False
        settings = get_json(f"{self.api_url}/admin/settings")
        return isinstance(settings, dict) and settings.get("home") == str(self.home)

    def process_exists(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, as another user's process
            pass
        return True


def get_json(url: str) -> object:
    """The JSON answer of GET `url`, or None when nothing (valid) answers."""
    try:
        with urllib.request.urlopen(url, timeout=ANSWER_TIMEOUT_S) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def recorded_server(home: Path) -> BackgroundServer | None:
    """The server the state file in `home` records, running or not; None without a state file."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
        return BackgroundServer(home=home, pid=int(state["pid"]), port=int(state["port"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"Unreadable server state file {home / STATE_FILE}: {err}; delete it and retry") from err


def running_server(home: Path) -> BackgroundServer | None:
    """The `visionflow server` of this Prefect home when it runs and answers, else None."""
    server = recorded_server(home)
    return server if server is not None and server.answers() else None


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (bound as a server binds it, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "no output"


def start_server(port: int) -> tuple[BackgroundServer, bool]:
    """Start `prefect server start` (UI on) on 127.0.0.1:`port` in the background, its database
    and log in the Prefect home, and return once it answers; when this home's server already
    runs, return that one. The flag says whether it was started now."""
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with locked(home / LOCK_FILE):
        running = running_server(home)
        if running is not None:
            return running, False
        if port_in_use(port):
            raise ConfigError(
                f"Port {port} on {HOST} is already in use by another process; choose a free one with --port"
            )
        api_url = f"{server_url(port)}/api"
        # Its own URL for its clients and for the UI in a browser, whatever a Prefect profile says.
        env = {**LEASE_STORAGE, **os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url}
        env["PREFECT_UI_API_URL"] = api_url
        with open(home / LOG_FILE, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port), "--ui"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no signal from a terminal, and no hangup, reaches it
            )
        server = BackgroundServer(home=home, pid=process.pid, port=port)
        atomic_write_json(home / STATE_FILE, {"pid": server.pid, "port": server.port})
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.answers():
            if process.poll() is not None:
                (home / STATE_FILE).unlink()
                raise ConfigError(
                    f"The Prefect server exited ({process.returncode}) before it answered on port {port}: "
                    f"{last_line(server.log)} (log: {server.log})"
                )
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                (home / STATE_FILE).unlink()
                raise ConfigError(
                    f"The Prefect server did not answer on port {port} within {START_TIMEOUT_S:.0f} s "
                    f"(log: {server.log})"
                )
            time.sleep(POLL_S)
        return server, True


def stop_server() -> str:
    """Stop this Prefect home's server and wait until its process has exited (SIGTERM to its
    session, SIGKILL after STOP_TIMEOUT_S); returns what it did, in one line. A recorded process
    that does not answer as this home's server is left alone (its pid may belong to another
    program by now), and its state file removed."""
    home = prefect_home()
    with locked(home / LOCK_FILE):
        server = recorded_server(home)
        if server is None:
            return "Prefect server not running"
        if not server.answers():
            (home / STATE_FILE).unlink()
            return (
                f"Prefect server not running: pid {server.pid} did not answer at {server.url}; "
                f"removed {home / STATE_FILE}"
            )
        start = time.monotonic()
        os.killpg(server.pid, signal.SIGTERM)
        if wait_until_gone(server, STOP_TIMEOUT_S):
            how = f"it exited {time.monotonic() - start:.1f} s after SIGTERM"
        else:
            os.killpg(server.pid, signal.SIGKILL)
            if not wait_until_gone(server, STOP_TIMEOUT_S):
                raise ConfigError(f"The Prefect server (pid {server.pid}) did not exit, even after SIGKILL")
            how = f"killed (SIGKILL), still running {STOP_TIMEOUT_S:.0f} s after SIGTERM"
        (home / STATE_FILE).unlink()
        return f"Prefect server stopped (pid {server.pid}, {server.url}): {how}"


def wait_until_gone(server: BackgroundServer, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the server's process to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while server.process_exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


class PrefectAPI:
    """The Prefect API a command's flows talk to, chosen before Prefect is imported, in this order:
    PREFECT_API_URL when it is set; the running `visionflow server` of this Prefect home; otherwise
    a server of its own, started with Prefect's public CLI (`prefect server start`) on a free port
    of 127.0.0.1, in its own session so that a terminal's Ctrl-C or hangup reaches only this
    process, and stopped when this process exits, last: after Prefect has sent its final logs and
    events. If this process dies without exit handlers (kill -9, the OOM killer), the kernel kills
    the server too (`parent_death_signal`; it starts no processes of its own). Create it in the
    main thread. That costs the seconds the server takes to start, so it says once how to avoid it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.server: BackgroundServer | None = None
        # atexit runs last what is registered first: registered before prefect is imported, close()
        # runs after every exit handler Prefect registers (the flush of its logs and events).
        atexit.register(self.close)
        if os.environ.get("PREFECT_API_URL"):
            return
        self.server = running_server(prefect_home())
        if self.server is not None:
            os.environ["PREFECT_API_URL"] = self.server.api_url
            return
        port = free_port()
        # Its errors go to an unnamed file, not a pipe: a pipe nobody reads during a long run would
        # fill up and block the server.
        self.errors = tempfile.TemporaryFile()
        # Starts while the flow modules import; wait() blocks until it answers.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
            env={**LEASE_STORAGE, **os.environ, "PREFECT_UI_ENABLED": "false"},
            stdout=subprocess.DEVNULL,
            stderr=self.errors,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )
        os.environ["PREFECT_API_URL"] = f"{server_url(port)}/api"

    @property
    def temporary(self) -> bool:
        return self.process is not None

    def wait(self, timeout: float = 120.0) -> None:
        """Block until the temporary server answers (no-op for any other API)."""
        if self.process is None:
            return
        print(TEMPORARY_SERVER_HINT, file=sys.stderr)
        health = os.environ["PREFECT_API_URL"] + "/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.errors.seek(0)
                stderr = self.errors.read().decode(errors="replace").strip().splitlines()
                raise ConfigError(
                    f"The temporary Prefect server exited ({self.process.returncode}): "
                    f"{stderr[-1] if stderr else 'no output'}; set PREFECT_API_URL to a running server"
                )
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(POLL_S)
        raise ConfigError(
            f"The temporary Prefect server did not answer within {timeout:.0f} s; "
            f"set PREFECT_API_URL to a running server"
        )

    def stop(self) -> None:
        """Stop the temporary server and everything it started (its session), waiting for it."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def close(self) -> None:
        """The command's last exit handler: `stop`. Then gc.freeze(): the interpreter's teardown no
        longer searches the millions of objects torch and Prefect made for reference cycles (over
        a second of a cached `visionflow train` on 2 cores) that the operating system frees at
        once anyway; objects outside cycles, open files among them, are still finalized."""
        self.stop()
        gc.freeze()
