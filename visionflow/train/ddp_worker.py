"""What every rank of a data-parallel training runs (torchrun starts it: `visionflow.train.launch`):
`python -m visionflow.train.ddp_worker WORK_DIR`. It joins the process group (nccl on CUDA, gloo on
the CPU, or training.distributed.backend), takes its share of the node's cores (or its GPU),
and calls the same `steps.train_run` as a single-process run; rank 0 writes the events, the
result and the checkpoints. No Prefect here: a rank never talks to the orchestrator.

An exception is recorded in WORK_DIR/errors/rank<N>.json (rank, type, one-line message, time)
before the process exits with it, so the caller can fail with the first rank's reason.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from pydantic import TypeAdapter

from visionflow.errors import one_line
from visionflow.fileio import atomic_write_text
from visionflow.steps import train_run
from visionflow.train.device import resolve_device
from visionflow.train.distributed import intra_op_threads
from visionflow.train.launch import (
    ERRORS_DIR,
    EVENTS_FILE,
    REQUEST_FILE,
    RESULT_FILE,
    EventWriter,
    TrainRequest,
)
from visionflow.train.records import FitResult
from visionflow.train.stopping import LAUNCHER_ENV, parent_death_signal


@contextmanager
def errors_recorded(work_dir: Path) -> Iterator[None]:
    """An exception inside is recorded in work_dir/errors/rank<RANK>.json (rank, type, one-line
    message, time), for the caller's error message, then raised on."""
    try:
        yield
    except Exception as err:
        rank = int(os.environ.get("RANK", 0))
        record = {"rank": rank, "type": type(err).__name__, "message": one_line(err), "time": time.time()}
        atomic_write_text(work_dir / ERRORS_DIR / f"rank{rank}.json", json.dumps(record))
        raise


def run_rank(work_dir: Path) -> None:
    """Join the process group and train this rank's share of the request in `work_dir`."""
    request = TrainRequest.model_validate_json((work_dir / REQUEST_FILE).read_text())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(intra_op_threads(int(os.environ["LOCAL_WORLD_SIZE"])))
    config = request.config
    device = resolve_device(config.training.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per rank
        torch.cuda.set_device(device)
    backend = config.training.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    training = config.training.model_copy(update={"device": str(device)})
    result = train_run(
        request.run_dir,
        request.dataset,
        config.model_copy(update={"training": training}),
        request.resume_from,
        callbacks=[EventWriter(work_dir / EVENTS_FILE)] if rank == 0 else [],
    )
    if rank == 0:
        atomic_write_text(work_dir / RESULT_FILE, TypeAdapter(FitResult).dump_json(result).decode())
    leave_group()


def leave_group() -> NoReturn:
    """Leave the process group and end this rank's process at once, exit status 0: everything it
    writes is written by now (atomically). DDP keeps the gloo backend and its threads alive past
    `destroy_process_group`, and tearing them down in the interpreter's exit now and then aborts the
    rank ("terminate called without an active exception", SIGABRT: seen once in about 60 CI runs),
    failing a run that had finished."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parent_death_signal(int(os.environ[LAUNCHER_ENV]))()  # torchrun killed (kill -9): this rank goes too
    work_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    with errors_recorded(work_dir):
        run_rank(work_dir)


if __name__ == "__main__":
    main()
