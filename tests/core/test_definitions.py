"""Concepts defined once and derived everywhere: the usable cores, the UTC timestamp, the run's file
and run names, the champion decision inside a manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

# What every consumer of the core count answers in a process restricted to one core.
_ONE_CORE_PROBE = """
import json, os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from visionflow.config import load_config
from visionflow.cores import usable_cores
from visionflow.data.decoded import default_num_workers
from visionflow.data.images import worker_count
from visionflow.sweep import trial_threads
from visionflow.train.device_limits import device_claim
from visionflow.train.distributed import intra_op_threads

print(json.dumps({
    "usable_cores": usable_cores(),
    "image_threads": worker_count(),
    "stream_workers": default_num_workers(),
    "trial_threads": trial_threads(1),
    "rank_threads": intra_op_threads(1),
    "cpu_limit_slots": device_claim(load_config(None, {"training.device": "cpu"}).training).slots,
}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_every_core_count_follows_the_cpu_affinity() -> None:
    """A process restricted to one core (taskset, a container's cpuset) sizes every pool by that
    one core, whatever os.cpu_count() says about the machine."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _ONE_CORE_PROBE], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout) == {
        "usable_cores": 1,
        "image_threads": 5,  # one core + 4 for file I/O waits
        "stream_workers": 1,
        "trial_threads": 1,
        "rank_threads": 1,
        "cpu_limit_slots": 1,
    }
