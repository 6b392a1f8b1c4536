"""Report stems taken exclusively, so two runs never mix or lose each other's report.

Invariant: a report ``<stem>.json`` (and the files named after its stem, e.g. ``<stem>_acceptance.png``)
belongs to exactly one run. A run takes the stem before any work by creating ``<stem>.json`` with
``O_EXCL``, holding a reservation (its pid, host, start time and a random token); it writes its report
over that reservation only while the token is still its own. Then:

* a default stem (the start time) that another run took in the same second becomes ``<stem>_2``,
  ``<stem>_3``, ... (a unique stem, never a refusal);
* an explicit ``--report-name`` that is taken is refused before any work, naming the holder: a running
  job, or the finished report already there. A reservation whose process is gone (killed) is taken over.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dflash_gptoss.run_safety.preflight import OutputPathError

RESERVATION_KEY = "reserved_by"


@dataclass(frozen=True)
class Stem:
    """A stem this process holds in ``folder``: ``<name><suffix>`` is its reservation (for a report, the
    ``.json`` the report replaces)."""

    folder: Path
    name: str
    token: str
    suffix: str = ".json"

    @property
    def json_path(self) -> Path:
        return self.folder / f"{self.name}{self.suffix}"


def _holder(path: Path) -> dict | None:
    """The reservation in ``path``, or None when it holds something else (a finished report)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get(RESERVATION_KEY) if isinstance(data, dict) else None


def _alive(holder: dict) -> bool:
    """Whether the reserving process may still run (another host's process is assumed alive)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError, TypeError):
        return True
    return True


def _create(path: Path, token: str, *, replace: bool) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
              "started_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump({RESERVATION_KEY: holder}, f)
        f.write("\n")


def reserve(folder: Path, name: str, *, unique: bool, siblings: tuple[str, ...] = (), flag: str = "--report-name",
            suffix: str = ".json") -> Stem:
    """Take ``name`` (or, with ``unique``, the first free ``name_N``) in ``folder``; see the module doc.

    ``siblings`` are the other files of a report (``"{stem}_acceptance.png"``): a stem whose sibling
    exists is taken too.
    """
    token = secrets.token_hex(8)
    for n in range(1, 10_000):
        candidate = name if n == 1 else f"{name}_{n}"
        path = folder / f"{candidate}{suffix}"
        others = [folder / s.format(stem=candidate) for s in siblings]
        if not any(p.exists() for p in others):
            try:
                _create(path, token, replace=False)
                return Stem(folder, candidate, token, suffix)
            except FileExistsError:
                pass
        if unique:
            continue
        holder = _holder(path) if path.exists() else None
        if holder is not None and not _alive(holder):  # a killed run's reservation: take it over
            _create(path, token, replace=True)
            return Stem(folder, candidate, token, suffix)
        if holder is not None:
            raise OutputPathError(f"{flag} {name}: {path} is reserved by a running job (pid {holder.get('pid')} "
                                  f"on {holder.get('host')}, started {holder.get('started_utc')}); pass another "
                                  f"{flag} or wait for it.")
        taken = path if path.exists() else next(p for p in others if p.exists())
        raise OutputPathError(f"{flag} {name}: {taken} already holds an earlier report; pass another {flag} "
                              "(or remove the old report first).")
    raise OutputPathError(f"{flag}: no free stem {name}_N in {folder}.")


def still_ours(stem: Stem) -> bool:
    """Whether ``stem``'s reservation is still this run's (nobody took it over)."""
    holder = _holder(stem.json_path)
    return holder is not None and holder.get("token") == stem.token


def release(stem: Stem) -> None:
    """Give the stem back after a run that wrote no report (its reservation is removed, if this run still holds it)."""
    if still_ours(stem):
        stem.json_path.unlink(missing_ok=True)


def reserve_writer(path: Path, flag: str) -> Stem:
    """One writer at a time for a file a job writes at its end (``--summary-json``): ``<path>.writing`` is held
    while the job runs; a finished file is replaced when the job ends (it is that output's newer version)."""
    return reserve(path.parent, path.name, unique=False, flag=flag, suffix=".writing")
