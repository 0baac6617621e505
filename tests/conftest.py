"""Shared test fixtures: a temporary home for every cache and Prefect setting of the session,
paths to the read-only real data beside the repo, and the one temporary Prefect API of the
session. Plain helpers live in tests/helpers.py."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, TEMPORARY_HOMES, free_killed_holders_slots

SHARED_DATA = REPO.parent / "shared" / "data"
SESSION_HOME = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module is imported (Prefect reads its settings at import), point every
    per-user location at one temporary folder of the session, and drop every PREFECT_* setting of
    the caller's environment (a developer's PREFECT_API_URL or profile must not reach the tests).
    pytest-xdist workers start after this, with this environment: they share the folder."""
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller did it
        return
    home = Path(tempfile.mkdtemp(prefix="visionflow-tests-"))
    config.stash[SESSION_HOME] = home
    for name in [name for name in os.environ if name.startswith("PREFECT_")]:
        del os.environ[name]
    for name, folder in TEMPORARY_HOMES.items():
        os.environ[name] = str(home / folder)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # the servers the tests start phone no one


def pytest_unconfigure(config: pytest.Config) -> None:
    if SESSION_HOME in config.stash:
        shutil.rmtree(config.stash[SESSION_HOME], ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the session's Prefect API (`prefect_harness`) waits for a real server to start:
    marked `server`, like the tests that start one themselves."""
    for item in items:
        if "prefect_harness" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """What a test sets in os.environ ends with it: an in-process `main(["train", ...])` points
    PREFECT_API_URL at the temporary server it started, and stops that server."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


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


@pytest.fixture(autouse=True)
def device_slots_freed_after_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test on the session's API, nothing trains any more: a device slot still taken was
    left by a run that was killed or timed out. Freed, so that one failure does not make every later
    training wait for ever (a real server frees it when the lease expires)."""
    yield
    if "prefect_harness" in request.fixturenames:
        free_killed_holders_slots()
