"""Shared test fixtures: paths to the read-only real data beside the repo, and the one temporary
Prefect API of the session."""

import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def live_processes_with(marker: str) -> list[int]:
    """Pids of the live processes (not zombies: a dead child its new parent has not reaped yet)
    whose environment contains `marker`, as NAME=VALUE (Linux /proc)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                state = (environ.parent / "stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z":
                    found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def start_in_session(
    argv: Sequence[str], cwd: Path, env: dict[str, str], *, stderr: int = subprocess.DEVNULL, sigint_ignored: bool
) -> subprocess.Popen:
    """`argv` in a session of its own (to signal or kill it whole), its stderr as text, with the
    signal dispositions of a command started from a terminal whatever the tests run under (SIGHUP at
    its default action: `nohup` would ignore it), or, with `sigint_ignored`, of a background job of
    a shell script, which starts with SIGINT ignored (#25: Ctrl-C was then lost)."""

    def dispositions() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored else signal.SIG_DFL)

    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        start_new_session=True,
        preexec_fn=dispositions,
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hymenoptera(shared_data: Path) -> Path:
    return shared_data / "hymenoptera_data"


@pytest.fixture(scope="session")
def cifar_mini(shared_data: Path) -> Path:
    return shared_data / "cifar10-mini"


@pytest.fixture(scope="session")
def sample_dataset() -> Path:
    return REPO / "data" / "sample"


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API (SQLite in a temp dir) for every test that asks for it.

    One per session: a second harness nested in the first would leave Prefect's events client
    bound to the first server, so task-run states would never reach the second. Opt-in, because
    the real-server tests (tests/flows/test_server.py) must not see its settings."""
    from prefect.testing.utilities import prefect_test_harness  # tests/core never imports prefect

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_killed_holders_slots() -> None:
    """What a Prefect server's repossessor does once a killed holder's leases expire: every
    device limit's slots free again. The session's test API (prefect_test_harness) runs no
    services, so a run killed (kill -9, a test's timeout) while it trained would hold its slots for
    the rest of the session; a test that kills one calls this after the kill, while nothing else trains."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from visionflow.train.device_limits import DEVICE_LIMIT_PREFIX

    with get_client(sync_client=True) as client:
        for limit in client.read_global_concurrency_limits(limit=100):
            if limit.name.startswith(DEVICE_LIMIT_PREFIX) and limit.active_slots:
                client.update_global_concurrency_limit(limit.name, GlobalConcurrencyLimitUpdate(active_slots=0))


@pytest.fixture(autouse=True)
def device_slots_freed_after_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test on the session's API, nothing trains any more: a device slot still taken was
    left by a run that was killed or timed out. Freed, so that one failure does not make every later
    training wait for ever (a real server frees it when the lease expires)."""
    yield
    if "prefect_harness" in request.fixturenames:
        free_killed_holders_slots()
