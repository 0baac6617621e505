"""Task-layer fixtures: one temporary Prefect API (SQLite in a temp dir) for the whole session.

Session scope because starting the ephemeral server costs seconds; every test in tests/tasks
shares it, so tests must filter what they read back (by artifact key, flow run id, ...).
"""

from collections.abc import Iterator

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_harness() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=60):
        yield
