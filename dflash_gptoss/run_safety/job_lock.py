"""One writer per output directory: an OS file lock held for a job's whole life.

Invariant: while a job writes a teacher cache out-dir or a ``save_directory/model_name`` run folder,
it holds an exclusive ``flock`` on ``<dir>/.dflash.lock``; a second job that wants the same folder is
refused at once with the holder's pid, host, start time and command (read from the lock file), before
it touches anything.

Why ``flock``: the kernel drops the lock when the holding process dies, however it dies (SIGKILL,
OOM, power loss on the host), so a lock left by a dead process is never "held": the next job takes it
over and rewrites the holder line; no pid liveness guesswork, no stale-lock timeout. On NFSv4 Linux
maps ``flock`` to byte-range locks the server arbitrates, so jobs on different hosts exclude each
other too.

Within one process the lock is re-entrant (a registry keyed by the real path): building a second
trainer over the same folder in the same Python process (tests, notebooks) is not a second writer.
Past one JAX process, only process 0 takes the lock and every process learns the outcome
(:func:`acquire_for_job`), so all hosts of a refused job exit with the same message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".dflash.lock"


class LockHeldError(RuntimeError):
    """Another live job holds the folder's lock (the message names it and the fix)."""


class DirLock:
    """An exclusive ``flock`` on ``<directory>/.dflash.lock``; release with :meth:`release`."""

    def __init__(self, directory: Path, fd: int, purpose: str) -> None:
        self.directory, self.fd, self.purpose = directory, fd, purpose
        self.count = 1

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def release(self) -> None:
        """Drop one hold; the lock goes when the last one does (or when the process exits)."""
        self.count -= 1
        if self.count == 0 and self.fd >= 0:
            _HELD.pop(str(self.directory), None)
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[str, DirLock] = {}


def holder_info(purpose: str) -> dict[str, Any]:
    """Who holds the lock: written into the lock file for the next job's error message."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since_unix": int(time.time()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "purpose": purpose,
            "command": " ".join(sys.argv)[:500]}


def read_holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The holder line of a lock file (None when absent or unreadable)."""
    try:
        return json.loads((Path(directory) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


HOLDER_WAIT_S = 5.0
"""How long a refused job waits for the holder's line: the holder writes it right after taking the lock,
but a process descheduled in between (a busy single core) leaves the file empty for a moment."""


def _wait_for_holder(directory: Path) -> dict[str, Any] | None:
    """The holder line, re-read for up to :data:`HOLDER_WAIT_S` while it is absent or half-written."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while (holder := read_holder(directory)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return holder


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (its holder line is not written yet)"
    return (f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')} "
            f"({holder.get('purpose')}: {holder.get('command')})")


def acquire(directory: str | os.PathLike, purpose: str, *, wait: bool = False) -> DirLock:
    """Take the folder's lock (creating the folder) or raise :class:`LockHeldError` at once; with
    ``wait``, block until the holder is done instead (for work that the next job may simply reuse)."""
    path = Path(directory).absolute()
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key].count += 1
        return _HELD[key]
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise LockHeldError(
            f"{path} is in use by {_describe(_wait_for_holder(path))}. Two jobs writing one folder would mix their "
            "files; wait for that job to finish (or stop it), or choose another folder.") from None
    line = (json.dumps(holder_info(purpose)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, line, 0)
    os.fsync(fd)
    lock = DirLock(Path(key), fd, purpose)
    _HELD[key] = lock
    return lock


def acquire_for_job(directory: str | os.PathLike, purpose: str) -> DirLock | None:
    """:func:`acquire` on process 0; past one JAX process every process raises the same error.

    Returns the lock on process 0 and None elsewhere. Call after ``jax.distributed`` is initialised.
    """
    from dflash_gptoss.distributed import is_main_process, is_multiprocess

    if not is_multiprocess():
        return acquire(directory, purpose)
    from dflash_gptoss.distributed import broadcast_message

    lock, message = None, ""
    if is_main_process():
        try:
            lock = acquire(directory, purpose)
        except LockHeldError as e:
            message = str(e)
    if shared := broadcast_message(message):
        raise LockHeldError(shared)
    return lock
