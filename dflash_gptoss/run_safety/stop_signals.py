"""Ctrl-C and SIGTERM as clean stops: the long jobs finish the step or chunk in flight, keep it, and exit.

Invariant: a job that receives SIGINT or SIGTERM never dies between two writes. The handler only
records the signal; the job looks at it at its next step (trainer) or chunk (cache builder, data
generation) boundary, saves what it has (a verified checkpoint, the cache's progress, the data
written so far), and raises :class:`StopRequested`, which its script turns into one line (what
stopped, where, what is kept, the command that continues) and the exit code ``128 + signal``
(130 for Ctrl-C, 143 for SIGTERM). A second signal stops at once, the default way.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):
    """A signal asked the job to stop; raised at a boundary where everything done so far is kept."""

    def __init__(self, signum: int, where: str, kept: str) -> None:
        self.signum, self.where, self.kept = signum, where, kept
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; {kept}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """Set by the first SIGINT/SIGTERM while :func:`stop_on_signals` is active."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


_active: StopFlag | None = None


def requested() -> StopFlag | None:
    """The active flag when a signal arrived (else None): what a job's boundary checks."""
    return _active if _active else None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """While active, SIGINT/SIGTERM set the flag instead of interrupting; a second one stops at once."""
    global _active
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():  # handlers live on the main thread only
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handler(signum: int, frame: object) -> None:
        if flag:  # the second signal: give up the clean stop
            for s, h in previous.items():
                signal.signal(s, h)
            signal.raise_signal(signum)
            return
        flag.signum = signum
        print(f"\n{signal.Signals(signum).name} received: stopping at the next boundary, keeping what is done "
              "(send it again to stop at once).", file=sys.stderr, flush=True)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    _active = flag
    try:
        yield flag
    finally:
        _active = None
        for s, h in previous.items():
            signal.signal(s, h)


def continue_command(argv: list[str], flag: str = "--resume") -> str:
    """The exact command that continues: this script's own command line, with ``flag`` added if it lacks one."""
    args = list(argv)
    if flag not in args and "--resume-if-possible" not in args:
        args.append(flag)
    return shlex.join(["python", *args])


def report(stop: StopRequested, argv: list[str]) -> int:
    """Print the stop's one line with the command that continues; return the exit code."""
    print(f"{stop} Continue with: {continue_command(argv)}", file=sys.stderr)
    return stop.exit_code
