"""Data-parallel training from the calling process: `launch_fit` starts `torchrun` as a child
process group running `visionflow.train.ddp_worker` on every rank, and turns rank 0's JSON-lines
events back into the caller's callbacks and progress lines, so a run with several ranks is
observed exactly like a single-process `engine.fit`. No Prefect here.

Files, in <run_dir>/distributed/ (rewritten by every launch; kept for post-mortems):
request.json (what the ranks train), events.jsonl (rank 0's fit_start / epoch_end events),
result.json (rank 0's FitResult), errors/rank<N>.json (the exception a rank raised), torchrun.log
(torchrun's and the ranks' output).

Stopping: any exception in the caller (Ctrl-C, Prefect's SIGTERM on cancellation, a failing
callback) sends torchrun SIGTERM, and torchrun stops its ranks; SIGKILL follows after
_STOP_GRACE_SECONDS. If the caller dies without a chance to do so (kill -9), torchrun and
then every rank get SIGKILL from the kernel (Linux's parent-death signal): no rank outlives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel, TypeAdapter

from visionflow.config import PipelineConfig, check_global_batch, decode_size, world_size
from visionflow.data.decoded import choose_loader, load_decoded
from visionflow.data.splits import DatasetInfo, decoded_cache_dir
from visionflow.errors import CheckpointError, ConfigError, DatasetError, DeviceError
from visionflow.fileio import atomic_write_text
from visionflow.train.device import resolve_device
from visionflow.train.distributed import intra_op_threads
from visionflow.train.engine import Progress, with_fast_settings
from visionflow.train.records import Callback, EpochMetrics, FitResult, FitStart, ModelSpec
from visionflow.train.stopping import LAUNCHER_ENV, StopGuard, TrainingTimedOut, parent_death_signal

WORKER_MODULE = "visionflow.train.ddp_worker"
WORK_DIR = "distributed"  # under the run directory
REQUEST_FILE = "request.json"
EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
ERRORS_DIR = "errors"
LOG_FILE = "torchrun.log"
FIT_START, EPOCH_END = "fit_start", "epoch_end"
_POLL_SECONDS = 0.2  # how often the caller reads new events and checks torchrun
_MONITOR_SECONDS = 0.2  # how often torchrun checks its ranks (a failed rank stops the others then)
_STOP_GRACE_SECONDS = 15  # after SIGTERM, before SIGKILL
# Exceptions a rank raises that keep their type in the caller: user errors stay one-line errors,
# a timeout still ends the run timed_out.
_KEPT_ERRORS = {
    cls.__name__: cls for cls in (ConfigError, DatasetError, CheckpointError, DeviceError, TrainingTimedOut)
}


class RankFailed(RuntimeError):
    """A rank of a data-parallel training failed (raised, or was killed)."""


class TrainRequest(BaseModel):
    """What every rank trains: the same arguments as `steps.train_run`."""

    run_dir: str
    dataset: DatasetInfo
    config: PipelineConfig  # precision and channels_last resolved: every rank uses the same
    resume_from: str | None


def torchrun_command(config: PipelineConfig, work_dir: Path, rdzv_id: str) -> list[str]:
    """The torchrun command line for `config.training.distributed`: --standalone on one node (a free
    port, no endpoint), else a c10d rendezvous at rdzv_endpoint named rdzv_id."""
    dist = config.training.distributed
    per_node = world_size(dist) // dist.nnodes
    if dist.rdzv_endpoint is None:
        rendezvous = ["--standalone"]
    else:
        rendezvous = ["--nnodes", str(dist.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", dist.rdzv_endpoint]
        rendezvous += ["--rdzv-id", dist.rdzv_id or rdzv_id]
    return [
        *(sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(per_node)),
        *("--max-restarts", "0", "--monitor-interval", str(_MONITOR_SECONDS)),
        *("-m", WORKER_MODULE, str(work_dir)),
    ]


class EventWriter(Callback):
    """Rank 0's callback: fit_start and epoch_end as JSON lines, appended and flushed one by one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _write(self, kind: str, values: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": kind, **values}) + "\n")

    def on_fit_start(self, state: FitStart) -> None:
        self._write(FIT_START, TypeAdapter(FitStart).dump_python(state, mode="json"))

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        self._write(EPOCH_END, asdict(metrics))


class _Replay:
    """The caller's side of EventWriter: each event to the callbacks and the progress lines."""

    def __init__(self, epochs: int, callbacks: Sequence[Callback], progress_stream: TextIO | None) -> None:
        self.callbacks, self.progress, self.started = callbacks, Progress(epochs, progress_stream), False

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.pop("event")
        if kind == FIT_START:
            self.started = True
            state = TypeAdapter(FitStart).validate_python(event)
            for cb in self.callbacks:
                cb.on_fit_start(state)
        elif kind == EPOCH_END:
            metrics = EpochMetrics(**event)
            self.progress.epoch_end(metrics)
            for cb in self.callbacks:
                cb.on_epoch_end(metrics)


def _read_events(path: Path, offset: int, on_event: Callable[[dict[str, Any]], None]) -> int:
    """Pass each complete line after byte `offset` to `on_event`; returns the new offset."""
    if not path.is_file():
        return offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
    for line in complete.splitlines():
        on_event(json.loads(line))
    return offset + len(complete)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun (it stops its ranks), SIGKILL after the grace period (the ranks follow it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _root_cause(log: str) -> tuple[int, str] | None:
    """(rank, traceback line) of torchrun's "Root Cause (first observed failure)" report, if any."""
    _, found, report = log.partition("Root Cause (first observed failure):")
    rank = re.search(r"rank\s*:\s*(\d+)", report)
    if not found or rank is None:
        return None
    traceback = re.search(r"traceback\s*:\s*(.+)", report)
    return int(rank.group(1)), traceback.group(1).strip() if traceback else "no traceback"


def _rank_error(work_dir: Path, returncode: int) -> Exception:
    """The failed rank's error as an exception naming the rank: the rank torchrun reports as the
    root cause (else the first to record an error), with the error it recorded, else how it ended
    (a signal: kill -9, the OOM killer); without either, torchrun's last lines."""
    recorded = {e["rank"]: e for e in map(json.loads, map(Path.read_text, (work_dir / ERRORS_DIR).glob("*.json")))}
    log = (work_dir / LOG_FILE).read_text(errors="replace")
    root = _root_cause(log)
    rank = root[0] if root else min(recorded.values(), key=lambda e: e["time"])["rank"] if recorded else None
    if rank in recorded:
        error = recorded[rank]
        kept = _KEPT_ERRORS.get(error["type"])
        if kept is not None:
            return kept(f"rank {rank}: {error['message']}")
        return RankFailed(f"rank {rank} failed: {error['type']}: {error['message']}")
    if root is not None:
        return RankFailed(f"rank {rank} failed: {root[1]} (see {work_dir / LOG_FILE})")
    last = " ".join(log.split()[-40:]) or "no output"  # its last 40 words
    return RankFailed(f"torchrun exited with code {returncode}: ...{last} (see {work_dir / LOG_FILE})")


def run_ranks(
    command: Sequence[str], work_dir: Path, on_event: Callable[[dict[str, Any]], None], threads_per_rank: int
) -> None:
    """Run a torchrun `command` whose rank 0 appends events to work_dir/events.jsonl, passing each to
    `on_event` while it runs; raise the first rank's error (see `_rank_error`) if it fails."""
    events = work_dir / EVENTS_FILE
    # OMP_NUM_THREADS: torchrun would otherwise set 1 (and warn); the ranks set torch's threads too.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads_per_rank)}
    env[LAUNCHER_ENV] = str(os.getpid())  # each rank dies with torchrun, torchrun with this process
    with open(work_dir / LOG_FILE, "wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=parent_death_signal(),
        )
        try:
            with StopGuard() as stop:  # a Ctrl-C or SIGTERM acts within one poll
                offset = 0
                while (code := proc.poll()) is None:
                    offset = _read_events(events, offset, on_event)
                    stop.check()
                    time.sleep(_POLL_SECONDS)
                _read_events(events, offset, on_event)
        except BaseException:  # Ctrl-C, a cancellation's SIGTERM, a failing callback: no rank outlives us
            _stop(proc)
            raise
    if code != 0:
        raise _rank_error(work_dir, code)


def launch_fit(
    request: TrainRequest, callbacks: Sequence[Callback] = (), progress_stream: TextIO | None = None
) -> FitResult:
    """`steps.train_run` on training.distributed's ranks through torchrun; returns rank 0's result.
    `callbacks` and `progress_stream` see the same calls as in a single-process run (all but
    `on_step_end`); TensorBoard is written by rank 0 into the run directory."""
    run_dir, dataset, config = request.run_dir, request.dataset, request.config.resolved()
    data = config.data
    check_global_batch(data.batch_size, world_size(config.training.distributed))
    spec = ModelSpec.of(config, dataset.classes)
    # Resolved once here, so that every rank trains with the same precision and memory format.
    config = with_fast_settings(config, spec, resolve_device(config.training.device))
    splits = (dataset.train, dataset.eval_split)
    if choose_loader(data, *splits) == "memory":  # decoded once here, not by every rank at once
        for split in splits:
            load_decoded(split, decode_size(data.image_size, data.crop_pct), decoded_cache_dir(data.data_dir))
    work_dir = Path(run_dir) / WORK_DIR
    shutil.rmtree(work_dir, ignore_errors=True)
    (work_dir / ERRORS_DIR).mkdir(parents=True)
    request = request.model_copy(update={"config": config})
    atomic_write_text(work_dir / REQUEST_FILE, request.model_dump_json())
    replay = _Replay(config.training.epochs, callbacks, progress_stream)
    command = torchrun_command(config, work_dir, Path(run_dir).name)
    per_node = world_size(config.training.distributed) // config.training.distributed.nnodes
    run_ranks(command, work_dir, replay, intra_op_threads(per_node))
    result = TypeAdapter(FitResult).validate_json((work_dir / RESULT_FILE).read_text())
    if replay.started:  # a finished run returns its stored result without calling callbacks
        for cb in callbacks:
            cb.on_fit_end(result)
    return result
