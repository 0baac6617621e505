"""The suite is hermetic (tests/conftest.py): visionflow's cache, Prefect's home and torch's hub
folder are temporary folders of the session, and a training plus a flow on the session's Prefect
API leave nothing under the user's home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, TEMPORARY_HOMES

# Representative tests: a fit with `precision: auto` (writes the machine's fast settings), and
# Prefect tasks with cached results on the session's API (write PREFECT_HOME).
WRITERS = (
    "tests/core/train/test_engine.py::test_the_default_recipe_whitens_the_first_layer_and_the_tutorial_recipe_does_not",
    "tests/tasks/test_caching.py",
)
USER_FOLDERS = (".cache/visionflow", ".cache/torch", ".prefect")


def test_every_per_user_folder_is_a_temporary_one() -> None:
    import torch
    from prefect.settings import get_current_settings

    from visionflow.fileio import user_cache_dir

    homes = {name: Path(os.environ[name]) for name in TEMPORARY_HOMES}
    assert len({home.parent for home in homes.values()}) == 1  # one session folder
    assert not any(home.is_relative_to(Path.home()) for home in homes.values()), homes
    assert user_cache_dir().parent == homes["XDG_CACHE_HOME"]
    assert Path(torch.hub.get_dir()).parent == homes["TORCH_HOME"]
    assert get_current_settings().home == homes["PREFECT_HOME"]  # as Prefect read it at import


def test_no_prefect_setting_of_the_caller_reaches_the_tests() -> None:
    assert {name for name in os.environ if name.startswith("PREFECT_")} == {
        "PREFECT_HOME",
        "PREFECT_SERVER_ANALYTICS_ENABLED",
    }


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(600)
def test_the_suite_writes_nothing_under_the_users_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    for name in TEMPORARY_HOMES:  # as a developer's shell has them: unset
        env.pop(name)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *WRITERS]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = [folder for folder in USER_FOLDERS if (home / folder).exists()]
    assert written == [], sorted(str(path.relative_to(home)) for path in home.rglob("*"))
