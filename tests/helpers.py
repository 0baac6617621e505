"""Plain helpers shared by the test modules, defined once here (fixtures live in the conftests):
processes, waiting, small datasets, a tiny engine fit, the CLI as a subprocess, run folders, and
read-back through the Prefect client. Prefect is imported inside the functions that need it, so
that the core tests never import it."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from PIL import Image

from visionflow.config import PipelineConfig, build_config, load_config
from visionflow.manifest import Manifest, utc_timestamp
from visionflow.models import build_model
from visionflow.retention import BUSY_SECONDS
from visionflow.runs import runs_root
from visionflow.train import engine, records
from visionflow.train.records import ModelSpec
from visionflow.train.rng import seed_everything

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
# The per-user locations the code under test writes to, each set to a folder of the session's
# temporary home (tests/conftest.py): visionflow's cache (fileio.user_cache_dir), Prefect's home
# (profiles, results, leases), torch's hub folder.
TEMPORARY_HOMES = {"XDG_CACHE_HOME": "cache", "PREFECT_HOME": "prefect", "TORCH_HOME": "torch"}
STOP_SECONDS = 20  # how long a stopped process may take to exit before it is killed
_PR_SET_PDEATHSIG = 1  # prctl option: the signal a child gets when its parent dies (linux/prctl.h)


# ---------------------------------------------------------------------------------------------
# Processes, read from /proc


def live_processes_with(marker: str) -> list[int]:
    """Pids of the live processes (not zombies: a dead child its new parent has not reaped yet)
    whose environment contains `marker`, as NAME=VALUE (Linux /proc)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                state = (environ.parent / "stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z":
                    found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (torchrun and its ranks carry the
    work dir), this one excluded."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        if text in args and int(cmdline.parent.name) != os.getpid():
            found.append(int(cmdline.parent.name))
    return found


def wait_until_gone(text: str, timeout: float = 20.0) -> list[int]:
    """Processes still mentioning `text` after up to `timeout` seconds ([] once they are gone)."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first found, grandchildren after), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def processes_with_env(root: int, name: str, value: str) -> list[int]:
    """The live descendants of process `root` whose environment has `name`=`value` (e.g. the
    processes of one flow run, PREFECT__FLOW_RUN_ID, under a worker)."""
    wanted = f"{name}={value}".encode()
    found = []
    for pid in _descendants(root):
        try:
            if wanted in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:  # exited meanwhile
            continue
    return found


# ---------------------------------------------------------------------------------------------
# Starting, waiting for and stopping processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    read: Callable[[], T], done: Callable[[T], bool], timeout: float, failure: Callable[[T], str], interval: float = 0.5
) -> T:
    """Call `read` until `done` holds for what it returns, and return that; fail the test with
    `failure(last value read)` when it still does not hold after `timeout` seconds."""
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout:.0f}s: {failure(value)}")
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def start_in_session(
    argv: Sequence[str], cwd: Path, env: dict[str, str], *, stderr: int = subprocess.DEVNULL, sigint_ignored: bool
) -> subprocess.Popen:
    """`argv` in a session of its own (to signal or kill it whole), its stderr as text, with the
    signal dispositions of a command started from a terminal whatever the tests run under (SIGHUP at
    its default action: `nohup` would ignore it), or, with `sigint_ignored`, of a background job of
    a shell script, which starts with SIGINT ignored (#25: Ctrl-C was then lost)."""

    def dispositions() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored else signal.SIG_DFL)

    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        start_new_session=True,
        preexec_fn=dispositions,
    )


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM the process group and every descendant, wait, then SIGKILL whatever is left."""
    tree = _descendants(process.pid)
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _signal_all(tree, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=STOP_SECONDS)
    _signal_all([pid for pid in tree if Path(f"/proc/{pid}").exists()], signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when pytest dies (Linux prctl). Not SIGTERM: a
    worker stopping gracefully waits forever to flush events to a server that died with pytest."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextmanager
def background(
    args: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path, user: str | None = None
) -> Iterator[subprocess.Popen]:
    """Run `args` in its own session with output to `log`, as `user` (its group, no other groups)
    when given; stopped (with its descendants) on exit."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            list(args),
            env=dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=None if user is None else [],
            preexec_fn=_die_with_parent,  # after the change of user, which clears the death signal
        )
    try:
        yield process
    finally:
        stop_process(process)


# ---------------------------------------------------------------------------------------------
# Small datasets


def write_image(
    path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 10), seed: int = 0, fmt: str | None = None
) -> Path:
    """Write a random-content image of the given mode; different seeds give different pixels."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode.startswith("I;16"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        shape = (height, width, bands) if bands > 1 else (height, width)
        rgb = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8).squeeze())
        image = rgb if rgb.mode == mode else rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def copy_tiny_dataset(source: Path, target: Path, classes: Sequence[str], train: int, val: int) -> Path:
    """`train`/`val` images per class from an ImageFolder tree with train/ and val/."""
    for split, count in (("train", train), ("val", val)):
        for name in classes:
            (target / split / name).mkdir(parents=True)
            for image in sorted((source / split / name).iterdir())[:count]:
                shutil.copy(image, target / split / name / image.name)
    return target


# ---------------------------------------------------------------------------------------------
# A tiny engine fit: a few steps of tudui on 32x32 tensors, no files

ENGINE_CLASSES = 4  # few classes: each gets a brightness band of its own to learn


class KillAfter(records.Callback):
    """A crash (KeyboardInterrupt) right after epoch `epoch` was checkpointed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, metrics: records.EpochMetrics) -> None:
        if metrics.epoch == self.epoch:
            raise KeyboardInterrupt


def engine_split(n: int, seed: int) -> SimpleNamespace:
    """A DecodedSplit-like object: class-dependent brightness so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % ENGINE_CLASSES  # (N,)
    noise = torch.randint(0, 128, (n, 3, 32, 32), generator=g)
    images = (noise + labels[:, None, None, None] * 40).to(torch.uint8)  # (N, 3, 32, 32)
    return SimpleNamespace(images=images, labels=labels, classes=tuple("abcd"))


ENGINE_TRAIN, ENGINE_EVAL = engine_split(96, 0), engine_split(32, 1)
ENGINE_SPEC = ModelSpec("tudui", ENGINE_CLASSES, 32, list("abcd"))


def engine_config(epochs: int = 2, **sections: dict[str, Any]) -> PipelineConfig:
    # Augmented (the default recipe leaves it off): resume and reproducibility cover its random streams.
    values = {"data": {"batch_size": 32, "augment": True}, "training": {"epochs": epochs, "device": "cpu"}}
    for section, fields in sections.items():
        values.setdefault(section, {}).update(fields)
    return build_config(values)


def engine_fit(config: PipelineConfig, checkpoint_dir=None, resume_from=None, callbacks=()) -> records.FitResult:
    seed_everything(config.training.seed)
    model = build_model("tudui", ENGINE_CLASSES)
    return engine.fit(
        model,
        ENGINE_TRAIN,
        ENGINE_EVAL,
        config,
        ENGINE_SPEC,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        callbacks=callbacks,
    )


# ---------------------------------------------------------------------------------------------
# The CLI as a subprocess, and run folders as it writes them


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`visionflow ARGV...` in this process: (exit code, stdout, stderr)."""
    from flows.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SCRIPT = Path(sys.executable).parent / "visionflow"
MB = 1_000_000


def cli_command() -> list[str]:
    # The console script is only regenerated when the package is reinstalled; an install older
    # than `[project.scripts] visionflow = "flows.cli:main"` still points elsewhere, so fall back
    # to the module, which runs the same main().
    if SCRIPT.is_file() and "flows.cli" in SCRIPT.read_text(errors="replace"):
        return [str(SCRIPT)]
    return [sys.executable, "-m", "flows.cli"]


def run_visionflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`visionflow ARGS` in `cwd`, to completion, its output captured."""
    return subprocess.run([*cli_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def cli_env() -> dict[str, str]:
    """The CLI in a subprocess, talking to this session's test API (`prefect_harness`)."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}


def age(run_dir: Path) -> None:
    """Every file of `run_dir` last modified 2 x BUSY_SECONDS ago: no longer a busy run."""
    old = time.time() - 2 * BUSY_SECONDS
    for path in [*run_dir.rglob("*"), run_dir]:
        os.utime(path, (old, old))


def make_run(output: Path, name: str, days_ago: float, status: str = "completed", size: int = MB) -> Path:
    """A run directory with a manifest started `days_ago` and a checkpoint of `size` bytes, aged
    past BUSY_SECONDS (running: this process, so it is alive)."""
    run_dir = runs_root(output) / name
    (run_dir / "checkpoints").mkdir(parents=True)
    started = utc_timestamp(datetime.now(timezone.utc) - timedelta(days=days_ago))
    manifest = Manifest.start(name, PipelineConfig(), started, None)
    if status != "running":
        manifest = manifest.finish(status)
    manifest.save(run_dir)
    (run_dir / "checkpoints" / "best.pt").write_bytes(os.urandom(size))
    age(run_dir)
    return run_dir


# ---------------------------------------------------------------------------------------------
# The training flow on tiny data, and what it left on the Prefect API

TINY_CLASSES = ("airplane", "automobile", "cat", "ship")
HEAVY_TASKS = (
    "download_dataset",
    "validate_data",
    "preview_transforms",
    "describe_model",
    "train_model",
    "evaluate_checkpoint",
    "export_checkpoint",
)
FINAL_STATES = {"Completed", "Cached", "Failed", "Crashed", "Cancelled"}


def tiny_config(dataset: Path, output: Path, **overrides: Any) -> PipelineConfig:
    """One CPU epoch on `dataset`, everything written under `output`; overrides by dotted field."""
    values = {
        "data.dataset": str(dataset),
        "data.data_dir": str(output / "data"),
        "data.batch_size": 16,
        "training.epochs": 1,
        "training.device": "cpu",
        "output.output_dir": str(output),
    }
    return load_config(None, {**values, **overrides})


def train(config: PipelineConfig) -> dict[str, Any]:
    """Run the training flow; its manifest as the JSON-ready dict written to manifest.json."""
    from flows.train import train_pipeline

    return train_pipeline(config).model_dump(mode="json")


def run_dir_of(manifest: dict[str, Any]) -> Path:
    return Path(manifest["config"]["output"]["output_dir"]) / "runs" / manifest["run_name"]


def task_name(run: Any) -> str:
    """The name of the task a task run (prefect's TaskRun) ran: its task key is "<task name>-<code
    hash>" (run names are the readable ones of tasks/names.py)."""
    return run.task_key.rsplit("-", 1)[0]


def _flow_run_filter(flow_run_id: str) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))


def task_states(flow_run_id: str, timeout: float = 30.0) -> dict[str, str]:
    """Task name -> state name of a flow run's task runs, read through the API (task run states
    arrive as events, so wait until every one is final)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=_flow_run_filter(flow_run_id))
            states = {task_name(run): run.state.name for run in runs if run.state is not None}
            if states and set(states.values()) <= FINAL_STATES and len(states) == len(runs):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"task runs of {flow_run_id} not final after {timeout}s: {states}")
            time.sleep(0.5)


def task_run_names(flow_run_id: str) -> dict[str, str]:
    """Task name -> task run name of a flow run's task runs, once every one is final."""
    from prefect.client.orchestration import get_client

    task_states(flow_run_id)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=_flow_run_filter(flow_run_id))
    return {task_name(run): run.name for run in runs}


def _artifacts(flow_run_id: str, *keys: str) -> list[Any]:
    """The artifacts of a flow run (those under `keys` when given)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    by_run = ArtifactFilterFlowRunId(any_=[flow_run_id])
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=by_run, key=ArtifactFilterKey(any_=list(keys)) if keys else None)
        )


def artifact_keys(flow_run_id: str) -> set[str]:
    return {artifact.key for artifact in _artifacts(flow_run_id) if artifact.key}


def artifact_data(flow_run_id: str, key: str) -> Any:
    """The data of a flow run's artifact under `key` (a table's rows decoded)."""
    (artifact,) = _artifacts(flow_run_id, key)
    return json.loads(artifact.data) if artifact.type == "table" else artifact.data


def log_messages(flow_run_id: str, containing: str, timeout: float = 30.0, until: str | None = None) -> list[str]:
    """The flow run's log messages (its tasks' included) that contain `containing`, read once one
    containing `until` (default: `containing`) is there: logs are shipped to the API in the
    background, in the order they were written, so wait for the last line the caller relies on."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    until = containing if until is None else until
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any(until in log.message for log in logs) or time.monotonic() > deadline:
                return [log.message for log in logs if containing in log.message]
            time.sleep(0.5)


def free_killed_holders_slots() -> None:
    """What a Prefect server's repossessor does once a killed holder's leases expire: every
    device limit's slots free again. The session's test API (prefect_test_harness) runs no
    services, so a run killed (kill -9, a test's timeout) while it trained would hold its slots for
    the rest of the session; a test that kills one calls this after the kill, while nothing else trains."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    from visionflow.train.device_limits import DEVICE_LIMIT_PREFIX

    with get_client(sync_client=True) as client:
        for limit in client.read_global_concurrency_limits(limit=100):
            if limit.name.startswith(DEVICE_LIMIT_PREFIX) and limit.active_slots:
                client.update_global_concurrency_limit(limit.name, GlobalConcurrencyLimitUpdate(active_slots=0))


# ---------------------------------------------------------------------------------------------
# A checkpoint really trained, for scoring and exports


def trained_checkpoint(dataset: Path, work: Path) -> Path:
    """best.pt of one CPU epoch of tudui on `dataset` (ROOT/train|val/<class>/*), in `work`; its
    config names the dataset, so its eval split can be found again."""
    from visionflow.data.decoded import load_decoded
    from visionflow.data.splits import resolve_dataset

    info = resolve_dataset(str(dataset))
    config = build_config(
        {"data": {"dataset": str(dataset), "batch_size": 16}, "training": {"epochs": 1, "device": "cpu"}}
    ).resolved()
    train_split, eval_split = (load_decoded(split, 32, work / "cache") for split in (info.train, info.eval_split))
    spec = ModelSpec("tudui", len(info.classes), 32, list(info.classes))
    seed_everything(0)
    return engine.fit(
        spec.build(), train_split, eval_split, config, spec, checkpoint_dir=work / "checkpoints"
    ).best_checkpoint
