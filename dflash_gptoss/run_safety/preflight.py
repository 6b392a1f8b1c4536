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
        raise OutputPathError(f"{flag} {target}: {folder} is a file, so no folder can be made under it; "
                              "pass another folder.")
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


def check_output_dir(path: str | os.PathLike, flag: str, *, create: bool = False) -> Path:
    """``path`` will be written as a FOLDER; ``create`` makes it now (a report folder), else it is left for
    the job to make (a run folder that a refused job must not leave behind)."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {p} exists and is not a folder; pass a folder (new or existing).")
    _probe_writable(_nearest_existing(p), flag, p)
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p


def check_file_stem(stem: str, flag: str) -> str:
    """A plain file name stem (no folder part): what goes before ``.json`` / ``_x.png`` in an output folder."""
    if not stem or stem in (".", "..") or "/" in stem or "\\" in stem or "\0" in stem:
        raise OutputPathError(f"{flag} {stem!r} must be a plain file name (no '/', not empty); "
                              "put the folder in the out-dir flag instead.")
    return stem


def check_output_files(paths: list[Path], flag: str) -> None:
    """None of ``paths`` (files a run will write, replacing old ones) may be an existing folder."""
    for path in paths:
        if path.is_dir():
            raise OutputPathError(f"{flag}: {path} is a folder, but the run writes a file there; "
                                  "pass another name or remove that folder.")


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
