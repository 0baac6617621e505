"""Which devices a training occupies, named as the Prefect global concurrency limits that guard
them (`device:cpu`, `device:cuda:N`, `device:mps`), and how many slots it takes on each. No
Prefect here: tasks/training.py creates the limits and holds the slots while it trains.

Units: a GPU (or MPS) limit has one slot per training that may share the device (default 1: one
training at a time); the CPU limit has one slot per core, and a CPU training takes as many as
the cores it computes on (its torch threads, over all its ranks on this machine). So one plain
run takes the whole CPU and a second one waits, while a sweep's `parallel` trials, each on
`cores // parallel` threads, fit side by side.

Nothing here imports torch at import time: `device_claim` imports it, and only a training that
really trains calls it (a cached training never does)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from visionflow.config import TrainingConfig, world_size
from visionflow.cores import usable_cores

DEVICE_LIMIT_PREFIX = "device:"
# Seconds a slot's lease lasts without renewal: the holder renews it every 75% of that (Prefect's
# lease thread, 3 attempts), and a holder that died (kill -9, power loss) frees its slots this long
# after its last renewal, plus the server's repossessor loop (PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS,
# 15 s by default). 60 s is the shortest lease the Prefect 3.9 server grants.
LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class DeviceClaim:
    """The device limits a training takes slots of, how many on each, and each limit's size when
    visionflow creates it (an existing limit keeps the size it has: `prefect gcl update`)."""

    names: tuple[str, ...]  # e.g. ("device:cpu",), ("device:cuda:0", "device:cuda:1")
    occupy: int  # slots taken on each limit: cores on the CPU, 1 on a GPU
    slots: int  # size of a limit created now: training.device_slots, else 1 (GPU, MPS) or the CPU's cores

    def __post_init__(self) -> None:
        if not self.names or self.occupy < 1 or self.slots < 1:
            raise ValueError(f"Invalid device claim {self}: expected limit names and occupy, slots >= 1")


def gpu_limit_name(index: int, visible_devices: str | None) -> str:
    """`device:cuda:<N>` for CUDA device `index` as this process numbers it: N is the machine's
    numbering, through CUDA_VISIBLE_DEVICES when it is set (`visible_devices`; an entry may be an
    index or a GPU UUID), so that workers given different GPUs take different limits."""
    entries = [entry.strip() for entry in visible_devices.split(",")] if visible_devices else []
    physical = entries[index] if index < len(entries) else str(index)
    return f"{DEVICE_LIMIT_PREFIX}cuda:{physical}"


def device_claim(training: TrainingConfig) -> DeviceClaim:
    """The device limits `training` occupies on this machine: `device:cpu` with the cores its
    torch threads (and ranks) use; `device:cuda:N` per GPU it trains on (one per local rank with
    several ranks); `device:mps`. Resolves `auto` and checks the device exists (DeviceError)."""
    import torch  # only a training that trains gets here

    from visionflow.train.device import resolve_device
    from visionflow.train.distributed import intra_op_threads

    device = resolve_device(training.device)
    distributed = training.distributed
    local_ranks = world_size(distributed) // distributed.nnodes
    if device.type == "cpu":
        cores = usable_cores()
        # Ranks share the cores as launch.run_ranks gives them out; one process uses torch's threads
        # (all cores by default; a sweep trial sets its share, sweep.trial_threads).
        used = local_ranks * intra_op_threads(local_ranks) if local_ranks > 1 else torch.get_num_threads()
        return DeviceClaim((f"{DEVICE_LIMIT_PREFIX}cpu",), used, training.device_slots or cores)
    if device.type == "mps":
        return DeviceClaim((f"{DEVICE_LIMIT_PREFIX}mps",), 1, training.device_slots or 1)
    # Several ranks train on cuda:0 .. cuda:<local ranks - 1> (ddp_worker), one process on its device.
    indices = range(local_ranks) if local_ranks > 1 else [device.index or 0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return DeviceClaim(tuple(gpu_limit_name(i, visible) for i in indices), 1, training.device_slots or 1)
