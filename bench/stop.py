"""Stop benchmark (not a test): does Ctrl-C stop a run, every time, and how fast? Run from the repo root:

    .venv/bin/python bench/stop.py [--dataset ../shared/data/cifar10-mini] [--epochs 4] [--runs 20]

Runs `visionflow train --epochs 4 --seed 3` as a user would (a fresh PREFECT_HOME, so each command
starts its temporary Prefect server), as a background job of a shell script starts it: in its own
session, with SIGINT ignored. One run goes uninterrupted, to measure how long training goes on
after the first checkpoint (last.pt). Then each of --runs runs gets SIGINT to its process group
(a terminal's Ctrl-C) at a random moment in that span after its first checkpoint, and the bench
records the exit status, the seconds from the signal to the exit, the manifest's status, and
whether any process of the run (they carry a marker in their environment) is alive 10 s later.

Each run prints one line; the last line is `stopped=<n>/<runs> worst_exit_s=<s> left_running=<n>`,
where a run counts as stopped when it exits 130 within 10 s with its manifest `interrupted`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import live_processes_with  # noqa: E402  (the same /proc reading as the tests)

MARKER = "VISIONFLOW_BENCH_RUN"


def start(work: Path, dataset: str, epochs: int, name: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(work / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env[MARKER] = str(work)
    argv = [sys.executable, "-m", "flows.cli", "train", "--dataset", dataset, "--epochs", str(epochs)]
    argv += ["--seed", "3", "--output", str(work / "out"), "--run-name", name]
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(work / "stderr.log", "w"),
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # a script's background job
    )


def wait_for(path: Path, proc: subprocess.Popen) -> float:
    """time.monotonic() when `path` appeared while `proc` runs."""
    while not path.exists():
        if proc.poll() is not None:
            last = (path.parents[4] / "stderr.log").read_text().strip().splitlines()[-1:]
            raise SystemExit(f"the run ended ({proc.returncode}) before {path} was written: {last}")
        time.sleep(0.02)
    return time.monotonic()


def training_span(work: Path, dataset: str, epochs: int) -> float:
    """Seconds from the first last.pt to the last one, in an uninterrupted run."""
    proc = start(work, dataset, epochs, "whole")
    last = work / "out" / "runs" / "whole" / "checkpoints" / "last.pt"
    wait_for(last, proc)
    first = last.stat().st_mtime
    if proc.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed ({proc.returncode})")
    return max(last.stat().st_mtime - first, 0.5)


def one_stop(work: Path, dataset: str, epochs: int, delay: float) -> tuple[int | None, float, str, int]:
    """(exit status or None when still running after 30 s, seconds to exit, manifest status, left running)."""
    proc = start(work, dataset, epochs, "stopped")
    run = work / "out" / "runs" / "stopped"
    wait_for(run / "checkpoints" / "last.pt", proc)
    time.sleep(delay)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code: int | None = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - sent
    time.sleep(max(0.0, 10 - seconds))
    left = live_processes_with(f"{MARKER}={work}")
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if code is None:
        proc.wait()
    status = json.loads((run / "manifest.json").read_text())["status"]
    return code, seconds, status, len(left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(REPO.parent / "shared" / "data" / "cifar10-mini"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="of the random moments")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        span = training_span(Path(tmp) / "whole", args.dataset, args.epochs)
        print(f"training after the first checkpoint: {span:.1f} s", flush=True)
        stopped, worst, left_running = 0, 0.0, 0
        for index in range(args.runs):
            delay = rng.uniform(0, span)
            code, seconds, status, left = one_stop(Path(tmp) / f"run{index}", args.dataset, args.epochs, delay)
            ok = code == 130 and seconds < 10 and status == "interrupted" and left == 0
            stopped, worst, left_running = stopped + ok, max(worst, seconds), left_running + left
            print(f"run {index + 1}: SIGINT {delay:.2f} s after the first checkpoint: exit {code} after "
                  f"{seconds:.2f} s, manifest {status}, {left} process(es) left", flush=True)  # fmt: skip
    print(f"stopped={stopped}/{args.runs} worst_exit_s={worst:.2f} left_running={left_running}")


if __name__ == "__main__":
    main()
