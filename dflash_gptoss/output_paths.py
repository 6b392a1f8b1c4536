"""Output paths checked before the work, so a long run never fails at its last step.

A run that computes for minutes and then cannot write its result has lost those
minutes. These checks run first: the folder is created (as the run would create it)
and a probe file is written and removed in it. Writing the probe is the only check
that tells the truth everywhere: ``os.access`` answers "yes" to root on a folder
with no write bits, and to anyone on a folder of a disk with no space left.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot receive the run's results; the message names the flag, the path and the fix."""


def check_output_dir(path: str | Path, flag: str) -> Path:
    """Make ``path`` a writable folder now (created with its parents if missing) or raise ``OutputPathError``."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{flag} {out} exists and is not a folder; pass a folder (new or existing).")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputPathError(f"{flag} {out}: {blocker} is a file, so no folder can be made under it; "
                              "pass another folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_probe_", delete=True) as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise OutputPathError(f"{flag} {out} is not writable ({err.strerror or err}); pass a folder you can "
                              "write to.") from None
    return out


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
