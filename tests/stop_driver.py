"""The `visionflow` CLI with a stop signal sent from inside one phase of its run: the Nth call of one
function of the core sends the signal (to this process, or to its whole process group as a
terminal's Ctrl-C does), writes when it did on stderr, then lets the call go on. Test-only: the
product has no hook for this; the function is wrapped before the CLI imports the modules that use it.

    python -m tests.stop_driver MODULE:QUALNAME N SIGNAL process|group CLI-ARGUMENTS...
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
import time
from typing import Any

SENT = "stop_driver: sent"  # the stderr line's start; then the signal's name and time.monotonic()


def send_on_call(target: str, call: int, signum: int, to_group: bool) -> None:
    """Wrap `target` (MODULE:QUALNAME) so that its `call`th call sends `signum`."""
    module, qualname = target.split(":")
    owner: Any = importlib.import_module(module)
    *parents, name = qualname.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            print(f"{SENT} {signal.Signals(signum).name} {time.monotonic()}", file=sys.stderr, flush=True)
            os.killpg(0, signum) if to_group else os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    target, call, name, to, *argv = sys.argv[1:]
    send_on_call(target, int(call), signal.Signals[name], to == "group")
    from flows.cli import main

    sys.exit(main(argv))
