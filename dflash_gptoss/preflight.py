"""Checks before expensive work: every output path is writable and of the right kind.

Invariant: a job that writes a file or folder at its END (an exported draft, a benchmark report, a
data file, a summary) learns in its first second that it cannot, never after hours of work. A path
"can be written" when it is not something else (a file where a folder is wanted, or the reverse) and
a probe file can really be created in the folder that will hold it, or in its nearest existing parent
when that folder does not exist yet: a real write, because permission bits say nothing for root and
nothing about a read-only mount or a full disk.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be written (the message names the flag, the path and the fix)."""


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        p = p.parent
    return p


def _probe_writable(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a file in ``folder`` (the folder that will hold ``target``, or its nearest parent)."""
    if not folder.is_dir():
        raise OutputPathError(f"{flag} {target}: {folder} is a file, so no folder can be made there; "
                              "choose another path.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dflash-write-probe-", dir=folder)
    except OSError as e:
        raise OutputPathError(f"{flag} {target}: cannot write in {folder} ({e.strerror}); choose a writable "
                              "location.") from e
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` will be written as a FILE (created with its parent folders if needed)."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise OutputPathError(f"{flag} {p} is a directory; give the path of a file to write.")
    _probe_writable(_nearest_existing(p.parent), flag, p)
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` will be written as a FOLDER (created if needed)."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {p} exists and is a file; give a folder path.")
    _probe_writable(_nearest_existing(p), flag, p)
    return p


def write_failure_reason(e: OSError) -> str:
    """Why a write failed, in words, with the file: "the disk is full (/path)"."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"the disk is full{where}"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"not allowed to write{where} ({e.strerror})"
    return f"{e.strerror or e}{where}"


def write_failure_message(e: OSError, doing: str) -> str:
    """One readable line for a failed write: what was being done, which file, and why."""
    return f"{doing} failed: {write_failure_reason(e)}."
