"""Flow-test fixtures: tiny data (read-back helpers through the Prefect client are in
tests/helpers.py).

Tests opt in to the session's temporary Prefect API (`prefect_harness`, tests/conftest.py) with
`pytestmark = pytest.mark.usefixtures("prefect_harness")`: the real-server tests in this folder
run their own server and must not see the harness settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import TINY_CLASSES, copy_tiny_dataset


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory, sample_dataset: Path) -> Path:
    """4 classes x (8 train + 4 val) images of the bundled sample: one batch per epoch."""
    return copy_tiny_dataset(sample_dataset, tmp_path_factory.mktemp("tiny") / "data", TINY_CLASSES, 8, 4)
