"""Data-parallel training's view of the process group: which rank this process is, the few
collectives `engine.fit` needs (sums over ranks, rank 0's figures to every rank), the model
wrapping (DDP, SyncBatchNorm) and what a run records about its ranks. No Prefect here.

Outside a torch.distributed process group (a plain single-process run) every function is a
no-op, so `fit` has one code path. The processes are started by torchrun (`visionflow.train.launch`
starts it, `visionflow.train.ddp_worker` is what each rank runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from visionflow.cores import usable_cores
from visionflow.errors import ConfigError
from visionflow.manifest import DistributedRecord


def _in_group() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of its process group."""

    rank: int = 0
    world_size: int = 1
    initialized: bool = False  # inside a torch.distributed process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, TensorBoard and reports."""
        return self.rank == 0

    @classmethod
    def current(cls) -> "Ranks":
        """The process group's ranks, or a single process (rank 0 of 1) outside one."""
        if not _in_group():
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), True)


def intra_op_threads(local_world_size: int) -> int:
    """Threads per rank so that the ranks of one node share its cores without oversubscribing them."""
    return max(1, usable_cores() // local_world_size)


def sum_over_ranks(values: Tensor) -> Tensor:
    """`values` summed over every rank, in place (no-op in a single process). A CPU-GPU sync point on
    the caller's next read."""
    if _in_group():
        dist.all_reduce(values)
    return values


def from_main(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's `values` on every rank (no-op in a single process): decisions taken from them are the
    same everywhere, so no rank waits alone in a collective. A CPU-GPU sync point."""
    if not _in_group():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def wait_for_main() -> None:
    """Every rank waits here until rank 0 arrives (after it wrote a checkpoint)."""
    if _in_group():
        dist.barrier()


def data_parallel(
    model: nn.Module, device: torch.device, sync_batchnorm: bool, partly_frozen: bool = False
) -> tuple[nn.Module, nn.Module]:
    """(the module to save and evaluate, the module training batches run through): in a process group
    the second is DDP over the first, which averages gradients over the ranks in backward; else both are
    `model`. `sync_batchnorm` converts BatchNorm layers to SyncBatchNorm first (CUDA only).
    `partly_frozen`: some parameters get no gradient in some epochs (model.freeze_epochs), which DDP
    must look for after each backward (find_unused_parameters: one pass over the graph per step)."""
    if not _in_group():
        return model, model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError(
                f"Invalid config field 'training.sync_batchnorm': true needs CUDA, the device is {device.type} "
                "(on the CPU BN statistics are per rank): set it false or leave it empty"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=partly_frozen)


def describe(device: torch.device) -> DistributedRecord | None:
    """The run's ranks (gathered from every rank: call it on all of them); None in a single process."""
    if not _in_group():
        return None
    devices: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(devices, str(device))
    nnodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))  # torchrun: the number of node agents
    return DistributedRecord(
        backend=dist.get_backend(), world_size=dist.get_world_size(), nnodes=nnodes, devices=[str(d) for d in devices]
    )
