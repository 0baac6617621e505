"""Data-parallel pieces that need no process group: how batches are split over ranks, the world
size of a config and the global-batch rule (a single process sees every function as a no-op)."""

from __future__ import annotations

import pytest
import torch

from visionflow.config import DistributedConfig, build_config, check_global_batch, world_size
from visionflow.data.loaders import Batches, BatchOrder, DeviceLoader
from visionflow.errors import ConfigError
from visionflow.train.distributed import Ranks, from_main, sum_over_ranks
from visionflow.train.rng import Generators

CPU = torch.device("cpu")


def shard_batches(n: int, batch: int, rank: int, ranks: int) -> list[list[int]]:
    """The image indices rank `rank` of `ranks` trains on, batch by batch (images hold their index)."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 1, 1).contiguous()
    labels = torch.arange(n)
    order = BatchOrder(n, batch, shuffle=True, generator=Generators.seeded(0, CPU).shuffle, multiple_of=ranks)
    loader = DeviceLoader(images, labels, order)
    return [labels.tolist() for _, labels in Batches(loader, CPU, lambda x: x, shard=(rank, ranks))]


def test_ranks_split_every_global_batch_into_equal_disjoint_slices() -> None:
    whole = shard_batches(37, 8, 0, 1)  # one process: 5 batches, the last of 5 images
    assert [len(b) for b in whole] == [8, 8, 8, 8, 5]
    halves = [shard_batches(37, 8, rank, 2) for rank in (0, 1)]
    # Same permutation on both ranks; each global batch split in two equal halves, in order; the
    # last batch cut to a multiple of 2 (one image of the epoch left out).
    assert [len(b) for b in halves[0]] == [4, 4, 4, 4, 2] == [len(b) for b in halves[1]]
    for batch, (first, second) in enumerate(zip(*halves)):
        assert first + second == whole[batch][: len(first) + len(second)]
    assert len(BatchOrder(37, 36, multiple_of=2)) == 1  # 1 left: dropped


def test_world_size_and_the_global_batch_rule() -> None:
    assert world_size(DistributedConfig()) == 1
    assert world_size(DistributedConfig(nproc_per_node=4, nnodes=2, rdzv_endpoint="node0:29400")) == 8
    check_global_batch(64, 4)
    with pytest.raises(ConfigError, match=r"'data.batch_size': 64 does not divide by the world size 3"):
        check_global_batch(64, 3)
    with pytest.raises(ConfigError, match="nnodes 2 needs rdzv_endpoint"):
        build_config({"training": {"distributed": {"nnodes": 2}}})
    with pytest.raises(ConfigError, match="nproc_per_node"):
        build_config({"training": {"distributed": {"nproc_per_node": 0}}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_ranks_without_a_gpu_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="'gpu' but this machine has no CUDA device"):
        world_size(DistributedConfig(nproc_per_node="gpu"))


def test_a_single_process_is_rank_0_of_1_and_collectives_are_no_ops() -> None:
    assert Ranks.current() == Ranks(0, 1, False) and Ranks.current().is_main
    values = torch.tensor([1.5, 2.0])
    assert sum_over_ranks(values) is values and values.tolist() == [1.5, 2.0]
    assert from_main([0.25, 3.0], CPU) == [0.25, 3.0]
