"""StopGuard with real signals sent to this process: Ctrl-C waits for the next batch boundary, a
second one acts at once, SIGTERM goes to its handler at once (and again at the next check when a
finalizer dropped the handler's exception), and a deadline stops training the same way; then
`fit` stopped by a real SIGINT at a known step, and resumed to the same weights as an
uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, live_processes_with
from tests.helpers import engine_config as _config
from tests.helpers import engine_fit as _fit
from visionflow import checkpoints
from visionflow.train import records
from visionflow.train.stopping import StopGuard, StopRequested, TrainingTimedOut, stop_on_signal


def test_a_signal_waits_for_the_next_check() -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopGuard() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs the handler between bytecodes: it has run by now
        assert stop.pending == signal.SIGINT  # held, not raised
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        assert signal.getsignal(signal.SIGINT) is before  # delivered once: the guard is off
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_signal_acts_at_once() -> None:
    with pytest.raises(KeyboardInterrupt), StopGuard():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # never reached the end: the second signal raises here
        pytest.fail("the second SIGINT did not stop at once")


def test_sigterm_is_left_to_its_handler() -> None:
    """Prefect's flow engine handles SIGTERM (a worker cancelling the run) and accepts a cancellation
    only while its own handler is installed: the guard leaves SIGTERM alone."""
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with StopGuard() as stop:
            assert signal.getsignal(signal.SIGTERM) is handler
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert received == [signal.SIGTERM]  # at once
            stop.check()  # the handler returned (it let the run go on): nothing to raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_hangup_waits_for_the_next_check_like_ctrl_c() -> None:
    previous = signal.signal(signal.SIGHUP, stop_on_signal)  # what the CLI installs
    try:
        with StopGuard() as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.01)
            assert stop.pending == signal.SIGHUP
            with pytest.raises(StopRequested) as stopped:
                stop.check()
        assert stopped.value.code == 129 and stopped.value.signal == signal.SIGHUP
        assert signal.getsignal(signal.SIGHUP) is stop_on_signal
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_an_ignored_signal_stays_ignored() -> None:
    """The guard takes no signal the process ignores: it never says "stopping" and goes on (#25)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopGuard() as stop:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            stop.check()
            assert stop.pending is None
    finally:
        signal.signal(signal.SIGINT, previous)


HANDLED = """
import os, signal, sys, time
from visionflow.train.stopping import handle_stop_signals
handle_stop_signals()
assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # nohup: still ignored
os.kill(os.getpid(), signal.SIGHUP)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
"""


def test_a_command_handles_its_stop_signals_whatever_it_inherited() -> None:
    """Started as a script's background job under nohup (SIGINT and SIGHUP ignored): SIGINT raises
    KeyboardInterrupt, SIGTERM exits 143, SIGHUP stays ignored."""

    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    done = subprocess.run([sys.executable, "-c", HANDLED], cwd=REPO, preexec_fn=ignore, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM


ORPHANED = """
import subprocess, sys
from visionflow.train.stopping import parent_death_signal
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=parent_death_signal())
print(child.pid, flush=True)
child.wait()
"""


def test_a_child_dies_with_its_parent_killed() -> None:
    marker = f"VISIONFLOW_TEST_ORPHAN={os.getpid()}"
    env = {**os.environ, "VISIONFLOW_TEST_ORPHAN": str(os.getpid())}
    parent = subprocess.Popen([sys.executable, "-c", ORPHANED], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert sorted(live_processes_with(marker)) == sorted([parent.pid, child])
    parent.kill()  # SIGKILL: no exit handler runs
    parent.wait()
    deadline = time.monotonic() + 10
    while live_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_processes_with(marker) == []


class Terminated(Exception):
    """What Prefect's SIGTERM handler raises (TerminationSignal), without Prefect."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


class SignalledWhileCollected:
    """An object whose finalizer is running when SIGTERM's handler runs, as when the signal lands
    while the garbage collector finalizes an unclosed asyncio transport."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside __del__


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped exceptions
def test_a_sigterm_whose_exception_a_finalizer_dropped_is_raised_at_the_next_check() -> None:
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        SignalledWhileCollected()  # without the guard: Python prints "Exception ignored" and goes on
        hook = sys.unraisablehook
        with StopGuard() as stop:
            SignalledWhileCollected()  # dropped again, but the guard kept the exception
            with pytest.raises(Terminated):
                stop.check()
            stop.check()  # raised once
        assert sys.unraisablehook is hook
        with pytest.raises(Terminated), StopGuard():
            SignalledWhileCollected()  # after the last check: raised as the block ends
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_after_the_last_check_is_delivered_at_the_end() -> None:
    with pytest.raises(KeyboardInterrupt), StopGuard():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)


def test_the_deadline_stops_at_a_check() -> None:
    with StopGuard(timeout_seconds=0.05) as stop:
        stop.check()  # before the deadline: nothing
        time.sleep(0.06)
        with pytest.raises(TrainingTimedOut, match=r"training.timeout_minutes \(0.000833333\) reached"):
            stop.check()


class SignalAt(records.Callback):
    """Sends this process SIGINT after optimizer step `step` (as Ctrl-C would, mid-epoch)."""

    def __init__(self, step: int):
        self.step, self.steps = step, []

    def on_step_end(self, step, loss, lr):
        self.steps.append(step)
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_fit_stops_at_the_batch_boundary_and_resumes_to_the_same_weights(tmp_path) -> None:
    config = _config(epochs=3)  # 96 images, batches of 32: 3 steps per epoch
    stopper = SignalAt(step=5)  # epoch 2, batch 2
    with pytest.raises(KeyboardInterrupt):
        _fit(config, checkpoint_dir=tmp_path, callbacks=[stopper])
    assert stopper.steps == [1, 2, 3, 4, 5]  # the batch in flight finished, no other started
    last = checkpoints.load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1 and last["step"] == 3  # the last finished epoch, intact
    resumed = _fit(config, resume_from=tmp_path / "last.pt")
    assert resumed.weights_sha256 == _fit(config).weights_sha256


def test_fit_timeout_stops_training(tmp_path) -> None:
    config = _config(epochs=50, training={"timeout_minutes": 1e-5})  # 0.6 ms: the first check stops it
    with pytest.raises(TrainingTimedOut):
        _fit(config, checkpoint_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists()  # stopped inside epoch 1
