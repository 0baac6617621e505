"""Stopping training cleanly. Inside `StopGuard`, Ctrl-C (SIGINT) takes effect at the next batch
boundary, so the batch in flight finishes and no checkpoint is left half-written; a deadline
(training.timeout_minutes) ends training at a batch boundary too. No Prefect here: whatever
handled SIGINT before (Python's KeyboardInterrupt, a caller's handler) still handles it, only later.

SIGTERM goes to its handler at once: in a flow run, Prefect's engine turns it into a cancellation
(a worker cancelling the run from the UI) or a crash. Such a handler stops the run by raising, and
Python drops an exception raised while a finalizer (`__del__`, a weakref callback) runs, printing
"Exception ignored in ...": a SIGTERM landing there would be lost and training would go on to the
end. So the guard also notes SIGTERM and, when its handler's exception never arrived, calls the
handler again at the next check. Files are written atomically, so a SIGTERM mid-batch leaves no
half-written file either.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any


class TrainingTimedOut(TimeoutError):
    """Training ran past training.timeout_minutes and stopped at a batch boundary."""


class StopGuard:
    """`with StopGuard(timeout_seconds) as stop:` ... `stop.check()` at every batch boundary.

    In the main thread, the first SIGINT is held until the next `check()` (or the end of the
    block), which then runs the handler installed before the guard (Python's raises
    KeyboardInterrupt). A second SIGINT runs it at once (Ctrl-C twice: stop now; files are written
    atomically, so none is left half-written). SIGTERM runs its handler at once, and again at the
    next `check()` if the first call raised into a finalizer, which dropped the exception. In other
    threads, where Python delivers no signal, only the deadline applies. `check()` raises
    TrainingTimedOut once `timeout_seconds` (None = no limit) have passed since the block was
    entered.
    """

    def __init__(self, timeout_seconds: float | None = None):
        self.timeout_seconds = timeout_seconds
        self.pending: int | None = None  # the signal held for the next check()
        self._previous: dict[int, Any] = {}  # signal -> the handler the guard replaced
        self._deadline: float | None = None  # time.monotonic() past which check() raises

    def __enter__(self) -> StopGuard:
        if self.timeout_seconds is not None:
            self._deadline = time.monotonic() + self.timeout_seconds
        if threading.current_thread() is threading.main_thread():
            self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._hold)}
            if callable(signal.getsignal(signal.SIGTERM)):  # SIG_DFL and SIG_IGN lose nothing
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._pass_on)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        if self.pending is not None and exc_type is None:
            self._deliver(self.pending, None)  # a signal after the last check() is not lost
        self._restore()

    def check(self) -> None:
        """Call at a batch boundary: act on a held Ctrl-C or a dropped SIGTERM, then on the deadline."""
        if self.pending is not None:
            self._deliver(self.pending, None)
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

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        self.pending = signum  # still set after the call only if its exception was dropped
        self._previous[signum](signum, frame)
        self.pending = None  # the handler returned: it let the run go on

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
