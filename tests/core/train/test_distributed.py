"""Data-parallel training on the CPU: real torchrun processes, gloo on 127.0.0.1 (--standalone: a
free port). Ranks agree and train like one process; runs are reproducible and resume after a
kill -9; a failing rank fails the training with its reason and leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch

from tests.core.train.ddp_target import EPOCHS, tiny_fit
from tests.helpers import REPO, copy_tiny_dataset, processes_mentioning, wait_until_gone
from visionflow.checkpoints import load_checkpoint, load_model
from visionflow.config import load_config
from visionflow.data.decoded import load_decoded
from visionflow.data.splits import decoded_cache_dir, resolve_dataset
from visionflow.errors import ConfigError
from visionflow.evaluation import evaluate_model
from visionflow.steps import train_run
from visionflow.train.launch import ERRORS_DIR, EVENTS_FILE, WORK_DIR, RankFailed, TrainRequest, launch_fit, run_ranks
from visionflow.train.records import Callback, EpochMetrics, FitResult, FitStart

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
CLASSES = ("airplane", "automobile", "bird", "cat")
RUN_EPOCHS = 2
# Params of 2 ranks vs 1 process after the same steps: equal up to float32 rounding. Not bit-equal:
# each rank averages the loss over its half of the batch and DDP averages the halves' gradients,
# a different order of float additions than one mean over the whole batch. Measured here: max
# |difference| 7.5e-9 after 6 and after 12 SGD steps (7% and 12% of the values differ in their last
# bits); the tolerance leaves over 100x.
PARAM_ATOL = 1e-6


def torchrun(work_dir: Path, mode: str) -> list[str]:
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
        *("--max-restarts", "0", "--monitor-interval", "0.2", "-m", "tests.core.train.ddp_target", str(work_dir), mode),
    ]


@pytest.fixture(autouse=True)
def repo_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks import `tests.core.train.ddp_target` and this checkout's packages."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def test_two_ranks_hold_the_same_weights_and_train_like_one_process(tmp_path: Path) -> None:
    (tmp_path / ERRORS_DIR).mkdir()
    events: list[dict] = []
    run_ranks(torchrun(tmp_path, "train"), tmp_path, events.append, threads_per_rank=1)
    assert [e["epoch"] for e in events] == list(range(1, EPOCHS + 1))
    for event in events:  # every rank's weights, after every epoch
        assert len(event["digests"]) == 2 and event["digests"][0] == event["digests"][1], event

    class Keep(Callback):
        def __init__(self) -> None:
            self.states: dict[int, dict] = {}

        def on_epoch_end(self, metrics: EpochMetrics) -> None:
            self.states[metrics.epoch] = {k: v.clone() for k, v in models[0].state_dict().items()}

    models: list = []
    keep = Keep()
    tiny_fit([keep], models)  # one process, the same global batch
    for epoch in range(1, EPOCHS + 1):
        two_ranks = torch.load(tmp_path / f"epoch{epoch}.pt", weights_only=True)
        for name, value in keep.states[epoch].items():
            torch.testing.assert_close(two_ranks[name], value, rtol=0, atol=PARAM_ATOL, msg=f"{name} epoch {epoch}")


def test_a_failing_rank_fails_in_bounded_time_naming_rank_and_reason(tmp_path: Path) -> None:
    (tmp_path / ERRORS_DIR).mkdir()
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"^rank 1 failed: ValueError: bad label 7 in batch 3$"):
        run_ranks(torchrun(tmp_path, "fail"), tmp_path, lambda event: None, threads_per_rank=1)
    assert time.monotonic() - start < 60  # rank 0 waited in a barrier: torchrun stopped it
    assert processes_mentioning(str(tmp_path)) == []


# ---------------------------------------------------------------------------------------------
# The product path: steps.train_run -> torchrun -> visionflow.train.ddp_worker on every rank


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, sample_dataset: Path) -> Path:
    """4 classes x 40 train images (160: 10 steps of 16 per epoch), 4 x 4 val."""
    return copy_tiny_dataset(sample_dataset, tmp_path_factory.mktemp("ddp") / "tiny", CLASSES, 40, 4)


LAUNCHER = "import sys; from tests.core.train.test_distributed import train_tiny; train_tiny(*sys.argv[1:])"


class Record(Callback):
    """The callback calls a run makes, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_fit_start(self, state: FitStart) -> None:
        self.calls.append(("start", state.epoch))

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        self.calls.append(("epoch", metrics.epoch))

    def on_fit_end(self, result: FitResult) -> None:
        self.calls.append(("end", len(result.history)))


def train_tiny(
    dataset_dir: str,
    run_dir: str,
    nproc: int = 2,
    resume_from: str | None = None,
    callbacks: Sequence[Callback] = (),
    loader: str = "auto",
) -> FitResult:
    """The default recipe (AdamW, one-cycle, test-time flip) with augmentation on `nproc` CPU ranks,
    fp32, data.loader `loader`."""
    config = load_config(
        None,
        {
            "data.dataset": dataset_dir,
            "data.data_dir": str(Path(dataset_dir).parent / "data"),
            "data.batch_size": 16,
            "data.augment": True,  # every rank augments the whole global batch: resumed exactly
            "data.loader": loader,
            "data.num_workers": 1,
            "training.epochs": RUN_EPOCHS,
            "training.device": "cpu",
            "training.precision": "fp32",
            "training.channels_last": False,
            "training.distributed.nproc_per_node": nproc,
        },
    )
    return train_run(run_dir, resolve_dataset(dataset_dir), config, resume_from, callbacks, progress_stream=sys.stderr)


def test_runs_repeat_bit_for_bit_and_a_killed_launcher_resumes_to_the_same_weights(
    tiny_folder: Path, tmp_path: Path
) -> None:
    record = Record()
    first = train_tiny(str(tiny_folder), str(tmp_path / "first"), callbacks=[record])
    # Rank 0's events reach the caller's callbacks as in one process (and its epoch lines, stderr).
    assert record.calls == [("start", 0), *(("epoch", n) for n in range(1, RUN_EPOCHS + 1)), ("end", RUN_EPOCHS)]
    events = [json.loads(line) for line in (tmp_path / "first" / WORK_DIR / EVENTS_FILE).read_text().splitlines()]
    assert [e["event"] for e in events] == ["fit_start", *["epoch_end"] * RUN_EPOCHS]
    assert [e["eval_accuracy"] for e in events[1:]] == [m.eval_accuracy for m in first.history]
    second = train_tiny(str(tiny_folder), str(tmp_path / "second"))
    assert first.distributed is not None and first.distributed.world_size == 2
    assert first.distributed.devices == ["cpu", "cpu"] and first.distributed.backend == "gloo"
    assert len(first.history) == RUN_EPOCHS and first.weights_sha256 == second.weights_sha256
    saved = load_checkpoint(tmp_path / "first" / "checkpoints" / "last.pt")
    assert saved["world_size"] == 2 and not any(k.startswith("module.") for k in saved["model"])
    # Rank 0's evaluation during training is a single-process evaluation of the same weights.
    model, spec = load_model(tmp_path / "first" / "checkpoints" / "last.pt")
    info = resolve_dataset(str(tiny_folder))
    decoded = load_decoded(info.eval_split, spec.input_size, decoded_cache_dir(tiny_folder.parent / "data"))
    report = evaluate_model(model, spec, decoded, device="cpu")
    assert report.accuracy == pytest.approx(first.history[-1].eval_accuracy)
    assert report.loss == pytest.approx(first.history[-1].eval_loss, rel=1e-5)

    # kill -9 of the launcher after epoch 1: no chance to stop torchrun, which the kernel stops
    # (parent-death signal), and its ranks with it. An epoch takes a fraction of a second: on a busy
    # machine the kill can come after epoch 2 as well; then again, at most 3 times.
    for attempt in range(3):
        killed = tmp_path / f"killed{attempt}"
        launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(tiny_folder), str(killed)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        last = killed / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 120
        while not last.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()
        assert wait_until_gone(str(killed)) == []  # torchrun and both ranks followed it
        if 1 <= load_checkpoint(last)["epoch"] < RUN_EPOCHS:
            break
    assert 1 <= load_checkpoint(last)["epoch"] < RUN_EPOCHS

    resumed = train_tiny(str(tiny_folder), str(killed), resume_from=str(last))
    assert resumed.weights_sha256 == first.weights_sha256
    assert [m.epoch for m in resumed.history] == list(range(1, RUN_EPOCHS + 1))

    with pytest.raises(ConfigError) as refused:  # one process cannot continue 2 ranks' random streams
        train_tiny(str(tiny_folder), str(tmp_path / "one"), nproc=1, resume_from=str(last))
    message = str(refused.value)
    assert "\n" not in message and "world size 1" in message and "world size 2" in message


def test_two_ranks_streaming_train_the_memory_runs_weights(tiny_folder: Path, tmp_path: Path) -> None:
    memory = train_tiny(str(tiny_folder), str(tmp_path / "memory"), loader="memory")
    stream = train_tiny(str(tiny_folder), str(tmp_path / "stream"), loader="stream")
    assert (memory.loader, stream.loader) == ("memory", "stream") and stream.distributed.world_size == 2
    assert stream.weights_sha256 == memory.weights_sha256
    assert [m.eval_loss for m in stream.history] == [m.eval_loss for m in memory.history]


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)


def gpu_run(tiny_folder: Path, run_dir: Path, nproc: int, model: str) -> FitResult:
    """launch_fit directly (a world size of 1 would otherwise train in this process)."""
    config = load_config(
        None,
        {
            "data.dataset": str(tiny_folder),
            "data.data_dir": str(tiny_folder.parent / "data"),
            "data.batch_size": 16,
            "model.name": model,
            "training.epochs": 1,
            "training.device": "cuda",
            "training.distributed.nproc_per_node": nproc,
        },
    )
    return launch_fit(
        TrainRequest(run_dir=str(run_dir), dataset=resolve_dataset(str(tiny_folder)), config=config, resume_from=None)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_rank_nccl_through_torchrun(tiny_folder: Path, tmp_path: Path) -> None:
    result = gpu_run(tiny_folder, tmp_path, 1, "tudui")
    assert result.distributed is not None and result.distributed.backend == "nccl"
    assert result.distributed.devices == ["cuda:0"] and result.device == "cuda:0"
    load_model(tmp_path / "checkpoints" / "best.pt")  # the unwrapped state dict loads into a plain model


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_ranks_on_two_gpus_with_sync_batchnorm(tiny_folder: Path, tmp_path: Path) -> None:
    result = gpu_run(tiny_folder, tmp_path, 2, "resnet18_cifar")  # sync_batchnorm: on by default here
    assert result.distributed is not None and result.distributed.devices == ["cuda:0", "cuda:1"]
    load_model(tmp_path / "checkpoints" / "best.pt")  # SyncBatchNorm's state dict is BatchNorm's
