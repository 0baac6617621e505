"""Data-parallel training benchmark (not a test): 2 ranks against 1 process, on the CPU. Run from
the repo root:

    .venv/bin/python bench/distributed.py [--epochs 3] [--ranks 2] [--repeats 2]

On cifar10-mini/train (5,000 32x32 images), model tudui, with the product's defaults (global
batch 64, the default recipe, training.precision / channels_last `auto`), it trains with
`steps.train_run` in this one run, alternating `--repeats` times:

  1 process  today's in-process path (all cores to one process)
  N ranks    training.distributed.nproc_per_node N: torchrun, gloo, each rank cores // N threads and
             64 / N images of every global batch, DDP all-reducing the gradients every step

A figure is the training images/s of the best epoch after the first over the repeats
(`EpochMetrics.images_per_second`: the training loop only; process start, rendezvous and
evaluation excluded; the first epoch pays one-time costs): the speed each reaches when it has the
cores. The CPUs are shared with other work, so figures are noisy: rerun to compare.

step_overhead_ms = (global batch) x (1 / ips_N - 1 / (N x ips_1)): how much longer a step takes than
a perfect N-fold split of the single-process step (gradient all-reduce, synchronization, each rank
augmenting the whole global batch). scaling = ips_N / ips_1. On a 2-core CPU two ranks share the
cores that one process already uses, so scaling near or below 1 is expected; on N GPUs each rank
has its own device and the cost per step is the all-reduce, whose volume is printed per model.

The last line is `ddp_ranks=<N> step_overhead_ms=<x> scaling=<ips N ranks / ips 1 process>`.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionflow.config import MODEL_NAMES, load_config  # noqa: E402
from visionflow.data.splits import resolve_dataset  # noqa: E402
from visionflow.models import build_model  # noqa: E402
from visionflow.steps import train_run  # noqa: E402
from visionflow.train.records import FitResult  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "cifar10-mini"
BUS_GB_PER_S = 100  # an illustrative all-reduce bus bandwidth (NVLink-class) for the GPU estimate


def _train(run_dir: Path, epochs: int, ranks: int) -> FitResult:
    config = load_config(
        None,
        {
            "data.dataset": str(DATA),
            "data.data_dir": str(REPO / "data"),
            "training.epochs": epochs,
            "training.device": "cpu",
            "training.distributed.nproc_per_node": ranks,
        },
    )
    return train_run(run_dir, resolve_dataset(str(DATA), download=False), config, progress_stream=io.StringIO())


def _epoch_ips(result: FitResult) -> list[float]:
    return [m.images_per_second for m in result.history[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not counted")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel run")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each")
    args = parser.parse_args()
    ips: dict[int, list[float]] = {1: [], args.ranks: []}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        for repeat in range(args.repeats):
            for ranks in ips:
                result = _train(Path(tmp) / f"{ranks}-{repeat}", args.epochs, ranks)
                ips[ranks] += _epoch_ips(result)
                print(f"{ranks} rank(s), run {repeat + 1}: " + ", ".join(f"{x:,.0f}" for x in _epoch_ips(result)))
    batch = load_config().data.batch_size
    ips_1, ips_n = max(ips[1]), max(ips[args.ranks])
    overhead_ms = 1000 * batch * (1 / ips_n - 1 / (args.ranks * ips_1))
    print(f"precision {result.precision}, channels_last {result.channels_last} (auto, resolved once for all ranks)")
    print(f"1 process: {ips_1:,.0f} images/s; {args.ranks} ranks ({result.distributed.backend}): {ips_n:,.0f} images/s")
    for name in MODEL_NAMES:
        params = sum(p.numel() for p in build_model(name, 10).parameters())
        volume = 4 * params  # fp32 gradients (bf16 autocast keeps fp32 parameters and gradients)
        ring = 2 * (args.ranks - 1) / args.ranks * volume  # bytes each rank sends in a ring all-reduce
        print(
            f"all-reduce per step, {name}: {params:,} parameters = {volume / 1e6:.2f} MB of gradients; "
            f"each rank sends {ring / 1e6:.2f} MB (ring), ~{ring / (BUS_GB_PER_S * 1e9) * 1e3:.2f} ms "
            f"at {BUS_GB_PER_S} GB/s"
        )
    print(f"ddp_ranks={args.ranks} step_overhead_ms={overhead_ms:.2f} scaling={ips_n / ips_1:.2f}")


if __name__ == "__main__":
    main()
