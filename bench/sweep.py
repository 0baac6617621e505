"""Sweep benchmark (not a test). Run from the repo root:

    .venv/bin/python bench/sweep.py [--epochs N] [--parallel K]

Product defaults (the bundled sample, tudui, the default recipe, 5 epochs, a local Dask cluster of
2 workers) and a 4-trial grid, optim.lr x training.seed. In one run, against one Prefect API (as
`visionflow` picks it: PREFECT_API_URL, a running `visionflow server`, else a temporary server):

  serial  the 4 trials' configs trained one after another with `train_pipeline` in this process
          (what looping over `visionflow train` does, without each command's process start), all
          cores each, into a fresh output folder and decoded-tensor cache; the sum of their times
  sweep   `sweep_pipeline` with the same trials, --parallel at a time (cores // parallel torch
          threads each), into another fresh output folder and cache: data steps, the cluster's
          start and every trial, wall time

The last line is `trials=4 parallel=<K> wall_vs_serial=<sweep wall / serial sum>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPACE = {"optim.lr": [0.001, 0.003], "training.seed": [0, 1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every trial (default: 5, the product's)")
    parser.add_argument("--parallel", type=int, default=2, help="trials at once in the sweep (default: 2)")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.prefect_server import PrefectAPI

    api = PrefectAPI()  # before prefect is imported, as the CLI does
    from flows.sweep import sweep_pipeline
    from flows.train import train_pipeline
    from visionflow.config import load_config
    from visionflow.cores import usable_cores
    from visionflow.sweep import SweepConfig, TrialProposer, check_space, trial_config

    api.wait()
    sweep = SweepConfig(space=SPACE, parallel=args.parallel, name="bench")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:

        def base(side: str):  # each side decodes and validates the data once, as a user's first run does
            overrides = {"training.epochs": args.epochs, "output.output_dir": f"{tmp}/{side}"}
            return load_config(None, {**overrides, "data.data_dir": f"{tmp}/{side}-data"})

        serial_base = base("serial")
        proposed = TrialProposer(check_space(serial_base, sweep), sweep, "max").next_batch()
        serial = []
        for index, params in enumerate(proposed):
            started = time.perf_counter()
            train_pipeline(trial_config(serial_base, params, sweep.name, index))
            serial.append(time.perf_counter() - started)
            print(f"serial trial {index} {params}: {serial[-1]:.1f} s", flush=True)
        started = time.perf_counter()
        result = sweep_pipeline(base("sweep"), sweep)
        wall = time.perf_counter() - started
    states = [row.state for row in result.rows]
    assert states.count("completed") == len(proposed), f"sweep trials: {states}"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"cpu: {cpu}, {usable_cores()} usable cores; {args.epochs} epochs a trial on the bundled sample")
    print(f"serial: {sum(serial):.1f} s ({' + '.join(f'{s:.1f}' for s in serial)}); sweep: {wall:.1f} s")
    print(f"trials={len(proposed)} parallel={args.parallel} wall_vs_serial={wall / sum(serial):.2f}")


if __name__ == "__main__":
    main()
