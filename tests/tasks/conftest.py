"""Task-layer fixtures: every test here runs against the session's temporary Prefect API
(tests/conftest.py), so tests must filter what they read back (by artifact key, flow run id, ...)."""

import pytest


@pytest.fixture(autouse=True)
def _prefect_api(prefect_harness: None) -> None:
    """Use the session's harness in every task-layer test."""
