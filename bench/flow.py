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

Then it compares the identical, fully cached rerun with a one-task Prefect flow (a whole new
Python process that picks its API as `visionflow train` does, runs one trivial task in a flow
and exits), in both modes, medians of --repeats alternating runs of each:

  temporary   no server running: each process starts `prefect server start` and stops it
  server      against one `visionflow server start`, started for this and stopped after

The last line is `first_s=<x> rerun_s=<y> flow_vs_engine=<z> one_task_temporary_s=...
rerun_temporary_s=... rerun_vs_one_task_temporary=... server_start_s=... one_task_server_s=...
rerun_server_s=... rerun_vs_one_task_server=...`.
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

from flows.prefect_server import free_port  # noqa: E402
from visionflow.checkpoints import load_checkpoint  # noqa: E402
from visionflow.config import build_config, load_config  # noqa: E402
from visionflow.data.splits import resolve_dataset  # noqa: E402
from visionflow.runs import RunLayout, runs_root  # noqa: E402
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

TARGETS = {"temporary": 1.3, "server": 1.5}  # the most a cached rerun may cost, in one-task flows
LABELS = {"temporary": "temporary server", "server": "visionflow server"}

# A one-task Prefect flow that gets its Prefect API the way `visionflow train` does (PrefectAPI).
ONE_TASK_FLOW = """
from flows.prefect_server import PrefectAPI

api = PrefectAPI()
from prefect import flow, task  # noqa: E402


@task
def one() -> int:
    return 1


@flow
def one_task() -> int:
    return one()


api.wait()
one_task()
"""


def timed(args: list[str], work: Path) -> float:
    """Wall-clock seconds of one command run as a user would (a fresh process, no PREFECT_API_URL,
    the bench's own Prefect home); exits the bench with its output when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(work / "prefect-home"), PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    start = time.perf_counter()
    done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds


def visionflow(work: Path, *args: str) -> float:
    """Wall-clock seconds of one `visionflow ARGS`."""
    return timed([sys.executable, "-m", "flows.cli", *args], work)


def timed_train(config_file: Path, work: Path, run_name: str) -> tuple[float, dict]:
    """Wall-clock seconds of one `visionflow train` and the run's manifest."""
    seconds = visionflow(work, "train", "--config", str(config_file), "--run-name", run_name)
    return seconds, json.loads(RunLayout(runs_root(work / "out") / run_name).manifest.read_text())


def not_cached(manifest: dict) -> list[str]:
    """The heavy tasks a run computed instead of taking from the cache."""
    return [name for name in HEAVY_TASKS if manifest["tasks"][name] != "cached"]


def rerun_vs_one_task(config_file: Path, work: Path, mode: str, repeats: int) -> tuple[float, float, float]:
    """Median seconds of an identical cached rerun and of a one-task flow, alternating, and their
    ratio; prints the comparison."""
    script = work / "one_task_flow.py"
    script.write_text(ONE_TASK_FLOW)
    reruns, one_tasks, recomputed = [], [], set()
    for i in range(repeats):
        seconds, manifest = timed_train(config_file, work, f"rerun-{mode}-{i}")
        reruns.append(seconds)
        recomputed.update(not_cached(manifest))
        one_tasks.append(timed([sys.executable, str(script)], work))
    rerun, one_task = statistics.median(reruns), statistics.median(one_tasks)
    verdict = f"NOT cached: {sorted(recomputed)}" if recomputed else "all heavy tasks cached"
    print(
        f"{LABELS[mode]}: cached rerun {rerun:.1f} s, one-task flow {one_task:.1f} s (medians of {repeats}): "
        f"{rerun / one_task:.2f}x (target <= {TARGETS[mode]}x; {verdict})"
    )
    return one_task, rerun, rerun / one_task


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
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side of a rerun comparison (default: 3)")
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
        recomputed = not_cached(rerun)
        verdict = f"NOT cached: {recomputed}" if recomputed else "all heavy tasks cached"
        print(f"rerun:      {rerun_s:6.1f} s  ({verdict})")
        temporary = rerun_vs_one_task(config_file, work, "temporary", args.repeats)
        server_start_s = visionflow(work, "server", "start", "--port", str(free_port()))
        try:
            server = rerun_vs_one_task(config_file, work, "server", args.repeats)
        finally:
            visionflow(work, "server", "stop")
        print(f"visionflow server start: {server_start_s:.1f} s")
        engine_rates += engine_images_per_second(engine_config.model_dump(mode="json"), work / "engine-after")
        engine = statistics.median(engine_rates)
        flow_history = load_checkpoint(RunLayout(runs_root(work / "out") / "first").last_checkpoint)["history"]
        flow = statistics.median(steady_rates(flow_history))
        print(
            f"training images/s (median per epoch): flow {flow:,.0f}, engine alone {engine:,.0f} "
            f"(manifest average: flow {first['timing']['train_images_per_second']:,.0f})"
        )
        print(
            f"first_s={first_s:.1f} rerun_s={rerun_s:.1f} flow_vs_engine={flow / engine:.3f} "
            f"one_task_temporary_s={temporary[0]:.1f} rerun_temporary_s={temporary[1]:.1f} "
            f"rerun_vs_one_task_temporary={temporary[2]:.2f} server_start_s={server_start_s:.1f} "
            f"one_task_server_s={server[0]:.1f} rerun_server_s={server[1]:.1f} rerun_vs_one_task_server={server[2]:.2f}"
        )


if __name__ == "__main__":
    main()
