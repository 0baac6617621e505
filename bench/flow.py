"""Training-flow benchmark (not a test). Run from the repo root:

    .venv/bin/python bench/flow.py [--dataset sample] [--epochs N]

Runs `visionflow train` twice as a user would (a fresh PREFECT_HOME, the ephemeral API, a
temporary output folder and decoded-tensor cache) and times each whole command, Prefect's
startup included:

  first   nothing cached: decoding, validation, training, evaluation, export
  rerun   the identical command: every heavy task must come back Cached

It also trains the same resolved config with the training step directly (`steps.train_run`, the
core call of the training task, without Prefect) on the same data, once before and once after
the flow runs, and compares the flow's training images/s with the engine's. Each side's figure
is the median of its per-epoch images/s, first epoch left out (it pays one-time kernel setup):
one whole-run average swings by +-10% on this shared machine, run to run, with or without Prefect.
The last line is `first_s=<x> rerun_s=<y> flow_vs_engine=<z>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionflow.checkpoints import load_checkpoint  # noqa: E402
from visionflow.config import build_config, load_config  # noqa: E402
from visionflow.data import resolve_dataset  # noqa: E402
from visionflow.runs import RunLayout  # noqa: E402
from visionflow.steps import train_run  # noqa: E402

HEAVY_TASKS = (
    "download_dataset",
    "validate_data",
    "compute_normalization",
    "preview_transforms",
    "describe_model",
    "train_model",
    "evaluate_checkpoint",
    "export_checkpoint",
)


def timed_train(config_file: Path, work: Path, run_name: str) -> tuple[float, dict]:
    """Wall-clock seconds of one `visionflow train` and the run's manifest."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(work / "prefect-home"), PYTHONPATH=str(REPO))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--config", str(config_file), "--run-name", run_name],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"visionflow train failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, json.loads((work / "out" / "runs" / run_name / "manifest.json").read_text())


def steady_rates(history: list[dict]) -> list[float]:
    """Per-epoch training images/s, the first (warm-up) epoch left out when there are more."""
    rates = [epoch["images_per_second"] for epoch in history]
    return rates[1:] or rates


def engine_images_per_second(config_values: dict, run_dir: Path) -> list[float]:
    """The training step alone (steps.train_run, what the training task calls), on the run's data
    and resolved config, without Prefect: its steady per-epoch images/s."""
    config = build_config(config_values)
    info = resolve_dataset(
        config.data.dataset, config.data.data_dir, config.data.val_fraction, config.data.split_seed, download=False
    )
    result = train_run(run_dir, info, config)
    return steady_rates([asdict(epoch) for epoch in result.history])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sample", help="dataset SPEC (default: sample)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config default (what `make run` uses)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="visionflow-bench-") as tmp:
        work = Path(tmp)
        overrides = {
            "data.dataset": args.dataset,
            "data.data_dir": str(work / "data"),
            "output.output_dir": str(work / "out"),
        }
        if args.epochs is not None:
            overrides["training.epochs"] = args.epochs
        config_file = work / "config.yaml"
        config_file.write_text(yaml.safe_dump(load_config(None, overrides).model_dump(mode="json")))

        # The training step alone, on its own copy of the decoded cache, before and after the flow runs
        # (the machine is shared: bracketing evens out load that changes during the bench).
        engine_config = load_config(None, {**overrides, "data.data_dir": str(work / "engine-data")}).resolved()
        engine_rates = engine_images_per_second(engine_config.model_dump(mode="json"), work / "engine-before")
        first_s, first = timed_train(config_file, work, "first")
        print(f"first run:  {first_s:6.1f} s  (tasks: {first['tasks']})")
        rerun_s, rerun = timed_train(config_file, work, "rerun")
        not_cached = [name for name in HEAVY_TASKS if rerun["tasks"][name] != "cached"]
        verdict = f"NOT cached: {not_cached}" if not_cached else "all heavy tasks cached"
        print(f"rerun:      {rerun_s:6.1f} s  ({verdict})")
        engine_rates += engine_images_per_second(engine_config.model_dump(mode="json"), work / "engine-after")
        engine = statistics.median(engine_rates)
        flow_history = load_checkpoint(RunLayout(work / "out" / "runs" / "first").last_checkpoint)["history"]
        flow = statistics.median(steady_rates(flow_history))
        print(
            f"training images/s (median per epoch): flow {flow:,.0f}, engine alone {engine:,.0f} "
            f"(manifest average: flow {first['timing']['train_images_per_second']:,.0f})"
        )
        print(f"first_s={first_s:.1f} rerun_s={rerun_s:.1f} flow_vs_engine={flow / engine:.3f}")


if __name__ == "__main__":
    main()
