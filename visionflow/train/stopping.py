"""Stopping training cleanly, and nothing outliving the command that started it.

Inside `StopGuard`, Ctrl-C (SIGINT) and a hangup (SIGHUP: the terminal closed, an ssh session
dropped) take effect at the next batch boundary, so the batch in flight finishes and no checkpoint
is left half-written; a deadline (training.timeout_minutes) ends training at a batch boundary too.
No Prefect here: whatever handled the signal before (Python's KeyboardInterrupt, `stop_on_signal`,
a caller's handler) still handles it, only later. A signal the process ignores stays ignored (the
guard never says "stopping" and then goes on): a command makes sure that its stop signals are
handled with `handle_stop_signals`, since a background job of a shell script starts with SIGINT
ignored.

SIGTERM is left to its handler: in a flow run, Prefect's engine turns it into a cancellation (a
worker cancelling the run from the UI) or a crash, and it accepts a worker's cancellation only
while its own SIGTERM handler is installed. Such a handler stops the run by raising, and Python
drops an exception raised while a finalizer (`__del__`, a weakref callback) runs, printing
"Exception ignored in ..." through `sys.unraisablehook`: a SIGTERM landing there would be lost and
training would go on to the end. So the guard watches that hook and raises a signal handler's
dropped exception again at the next check. Files are written atomically, so a SIGTERM mid-batch
leaves no half-written file either.

A child process dies with the process that started it, however that ends (kill -9 and the OOM
killer included): `parent_death_signal` asks the kernel for SIGKILL when its parent goes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Callable, NoReturn

HELD_SIGNALS = (signal.SIGINT, signal.SIGHUP)  # StopGuard holds these until the batch in flight ends
LAUNCHER_ENV = "VISIONFLOW_LAUNCHER_PID"  # the process that started torchrun, for its ranks
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)


class TrainingTimedOut(TimeoutError):
    """Training ran past training.timeout_minutes and stopped at a batch boundary."""


class StopRequested(SystemExit):
    """A stop signal other than Ctrl-C (SIGTERM, SIGHUP) ends the command: exit status 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal = signum


def stop_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    """A signal handler: unwind the stack as Ctrl-C does, so a run records how it ended."""
    raise StopRequested(signum)


def handle_stop_signals() -> None:
    """For a command's main thread: SIGINT raises KeyboardInterrupt even when the process started
    with it ignored (a background job of a shell script inherits that); SIGTERM and SIGHUP raise
    StopRequested (exit 143, 129). SIGHUP stays ignored when it was (`nohup`: meant to survive)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_on_signal)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, stop_on_signal)


def parent_death_signal(launcher: int | None = None) -> Callable[[], None]:
    """A function that asks the kernel to SIGKILL the calling process when its parent dies (Linux;
    elsewhere it does nothing), and kills it at once if the parent died before the request:
    - `launcher` None: a child's `preexec_fn`; its parent is the process calling this.
    - `launcher` a pid: the first call of a process started by a child of `launcher` (a rank that
      torchrun started); its parent must still be that child, a child of `launcher`.
    Resolved here, so that the call in a forked child before exec only makes system calls. The
    kernel watches the thread that started the child: start children from the main thread."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = functools.partial(ctypes.CDLL(None, use_errno=True).prctl, _PR_SET_PDEATHSIG, int(signal.SIGKILL))
    parent = os.getpid()

    def request() -> None:
        prctl()
        orphan = os.getppid() != parent if launcher is None else parent_of(os.getppid()) != launcher
        if orphan:
            os.kill(os.getpid(), signal.SIGKILL)

    return request


def parent_of(pid: int) -> int | None:
    """The parent of process `pid` (Linux /proc), None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class StopGuard:
    """`with StopGuard(timeout_seconds) as stop:` ... `stop.check()` at every batch boundary.

    In the main thread, the first SIGINT or SIGHUP is held until the next `check()` (or the end of
    the block), which then runs the handler installed before the guard (Python's raises
    KeyboardInterrupt, `stop_on_signal` StopRequested). A second one runs it at once (Ctrl-C
    twice: stop now; files are written atomically, so none is left half-written). A signal the
    process ignores stays ignored. SIGTERM's handler runs at once; if the exception it raised was
    dropped (it ran inside a finalizer), the next `check()` raises it. In other threads, where
    Python delivers no signal, only the deadline applies. `check()` raises TrainingTimedOut once
    `timeout_seconds` (None = no limit) have passed since the block was entered.
    """

    def __init__(self, timeout_seconds: float | None = None):
        self.timeout_seconds = timeout_seconds
        self.pending: int | None = None  # the signal held for the next check()
        self.dropped: BaseException | None = None  # a signal handler's exception a finalizer dropped
        self._previous: dict[int, Any] = {}  # signal -> the handler the guard replaced
        self._unraisablehook: Callable[[Any], Any] | None = None  # the hook the guard wraps
        self._deadline: float | None = None  # time.monotonic() past which check() raises

    def __enter__(self) -> StopGuard:
        if self.timeout_seconds is not None:
            self._deadline = time.monotonic() + self.timeout_seconds
        if threading.current_thread() is threading.main_thread():
            held = [signum for signum in HELD_SIGNALS if signal.getsignal(signum) != signal.SIG_IGN]
            self._previous = {signum: signal.signal(signum, self._hold) for signum in held}
            self._unraisablehook, sys.unraisablehook = sys.unraisablehook, self._note_dropped
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        try:
            if exc_type is None:
                self._act_on_signals()  # a signal after the last check() is not lost
        finally:
            self._restore()
            if self._unraisablehook is not None:
                sys.unraisablehook, self._unraisablehook = self._unraisablehook, None

    def check(self) -> None:
        """Call at a batch boundary: act on a held Ctrl-C or a dropped SIGTERM, then on the deadline."""
        self._act_on_signals()
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise TrainingTimedOut(f"training.timeout_minutes ({self.timeout_seconds / 60:g}) reached")

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is not None:
            self._deliver(signum, frame)  # the second signal: now
            return
        self.pending = signum
        # os.write, not print: the signal may have interrupted a write to sys.stderr.
        name = signal.Signals(signum).name
        os.write(2, f"\n{name}: stopping at the end of this batch ({name} again to stop now)\n".encode())

    def _act_on_signals(self) -> None:
        if self.dropped is not None:
            dropped, self.dropped = self.dropped, None
            raise dropped
        if self.pending is not None:
            self._deliver(self.pending, None)

    def _note_dropped(self, unraisable: Any) -> None:
        """sys.unraisablehook: keep an exception that a signal handler raised in the main thread
        (the handler's frame is in its traceback) for the next check(); report it as Python would."""
        if threading.current_thread() is threading.main_thread():
            handlers = (signal.getsignal(signal.SIGTERM), *self._previous.values(), self._hold)
            codes = {getattr(handler, "__code__", None) for handler in handlers} - {None}
            traceback = unraisable.exc_traceback
            while traceback is not None and self.dropped is None:
                if traceback.tb_frame.f_code in codes:
                    self.dropped = unraisable.exc_value
                traceback = traceback.tb_next
        self._unraisablehook(unraisable)

    def _deliver(self, signum: int, frame: FrameType | None) -> None:
        handler = self._previous.get(signum, signal.SIG_DFL)
        self.pending = None
        self._restore()
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)  # the default action, now that it is restored

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
