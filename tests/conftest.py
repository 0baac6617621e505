"""Shared test fixtures: paths to the read-only real data beside the repo."""

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
