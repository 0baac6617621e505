"""Shared test fixtures: paths to the read-only real data beside the repo, and the one temporary
Prefect API of the session."""

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
