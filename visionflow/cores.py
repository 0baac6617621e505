"""The cores this process may compute on: one answer for every thread pool, worker count, rank
share and CPU concurrency limit. No torch import here."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (a container's or taskset's restriction)
    where the OS reports one (Linux), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
