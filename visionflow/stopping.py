"""Stopping training cleanly. Inside `StopGuard`, Ctrl-C (SIGINT) takes effect at the next batch
boundary, so the batch in flight finishes and no checkpoint is left half-written; a deadline
(training.timeout_minutes) ends training at a batch boundary too. No Prefect here: whatever
handled SIGINT before (Python's KeyboardInterrupt, a caller's handler) still handles it, only later.

SIGTERM is left to its handler: in a flow run, Prefect's engine turns it into a cancellation (a
worker cancelling the run from the UI) or a crash, and it accepts a worker's cancellation only
while its own SIGTERM handler is installed. Such a handler stops the run by raising, and Python
drops an exception raised while a finalizer (`__del__`, a weakref callback) runs, printing
"Exception ignored in ..." through `sys.unraisablehook`: a SIGTERM landing there would be lost and
training would go on to the end. So the guard watches that hook and raises a signal handler's
dropped exception again at the next check. Files are written atomically, so a SIGTERM mid-batch
leaves no half-written file either.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable


class TrainingTimedOut(TimeoutError):
    """Training ran past training.timeout_minutes and stopped at a batch boundary."""


class StopGuard:
    """`with StopGuard(timeout_seconds) as stop:` ... `stop.check()` at every batch boundary.

    In the main thread, the first SIGINT is held until the next `check()` (or the end of the
    block), which then runs the handler installed before the guard (Python's raises
    KeyboardInterrupt). A second SIGINT runs it at once (Ctrl-C twice: stop now; files are written
    atomically, so none is left half-written). SIGTERM's handler runs at once; if the exception it
    raised was dropped (it ran inside a finalizer), the next `check()` raises it. In other threads,
    where Python delivers no signal, only the deadline applies. `check()` raises
    TrainingTimedOut once `timeout_seconds` (None = no limit) have passed since the block was
    entered.
    """

    def __init__(self, timeout_seconds: float | None = None):
        self.timeout_seconds = timeout_seconds
        self.pending: int | None = None  # the signal held for the next check()
        self.dropped: BaseException | None = None  # a signal handler's exception a finalizer dropped
        self._previous: dict[int, Any] = {}  # signal -> the handler the guard replaced (SIGINT's)
        self._unraisablehook: Callable[[Any], Any] | None = None  # the hook the guard wraps
        self._deadline: float | None = None  # time.monotonic() past which check() raises

    def __enter__(self) -> StopGuard:
        if self.timeout_seconds is not None:
            self._deadline = time.monotonic() + self.timeout_seconds
        if threading.current_thread() is threading.main_thread():
            self._previous = {signal.SIGINT: signal.signal(signal.SIGINT, self._hold)}
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
            handlers = (signal.getsignal(signal.SIGTERM), self._previous.get(signal.SIGINT), self._hold)
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
