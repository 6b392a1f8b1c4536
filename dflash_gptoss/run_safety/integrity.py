"""Manifests of finished outputs, and the teacher's fingerprint: nothing damaged is read silently.

Invariant: a teacher cache or a training checkpoint counts as finished only when its manifest
(``dflash_manifest.json``: every file's relative name, size and sha256) exists; the manifest is
written LAST, atomically, after every file it lists is flushed. Readers compare the folder with it
and refuse, naming the file, anything missing, truncated, added or altered.

Two depths of check, because their costs differ by orders of magnitude:

* ``"size"``: every listed file exists with its recorded size (a stat per file: instant at any size);
  catches the commonest damage (a copy or a build cut short, a deleted shard);
* ``"full"``: every byte re-hashed (sha256, streamed in 8 MiB chunks so memory stays flat; ~1.4 GB/s
  on one x86 core with SHA extensions). The demo's 0.4 GB cache takes a fraction of a second; a
  ~100 GB gpt-oss-20b cache takes over a minute, which is why the trainer checks caches fully only up
  to :data:`AUTO_FULL_BYTES` and names the ``scripts/dflash_verify.py`` command for the rest.
  Checkpoints (draft weights + optimizer state) are always checked fully before they are resumed or
  exported: they are far smaller than a cache and a silently altered weight trains on unnoticed.

The teacher fingerprint identifies a snapshot's WEIGHTS without reading all of them: sha256 over each
safetensors file's name, size, header (tensor names, dtypes, shapes, offsets) and three 1 MiB samples
of its data (start, middle, end). Two teachers of the same shapes trained apart differ in essentially
every weight, so the samples tell them apart; reading 13 GB to say so would cost a minute per run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST_NAME = "dflash_manifest.json"
MANIFEST_FORMAT = "dflash-gptoss-manifest"
MANIFEST_VERSION = 1
AUTO_FULL_BYTES = 4 << 30
"""Caches up to this size are re-hashed in full when training starts (~3 s); larger ones get the size
check there and a full check with ``scripts/dflash_verify.py``."""
FINGERPRINT_SAMPLE = 1 << 20
CHECKS = ("size", "full")


class IntegrityError(ValueError):
    """A folder does not match its manifest, or has none (the message names the file and the fix)."""


def file_sha256(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of a file (``hashlib.file_digest``), reporting the bytes read to ``progress``."""
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f if progress is None else _Counted(f, progress), "sha256").hexdigest()


class _Counted(io.RawIOBase):
    """A raw file that reports every read's size (for a progress bar over ``hashlib.file_digest``)."""

    def __init__(self, raw: Any, progress: Callable[[int], None]) -> None:
        self.raw, self.progress = raw, progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.progress(n)
        return n


def listed_files(root: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Every regular file under ``root`` a manifest covers: not the manifest, not lock or temp files."""
    from dflash_gptoss.run_safety.job_lock import LOCK_NAME

    out = []
    for p in sorted(root.rglob("*")):
        name = p.name
        if not p.is_file() or name in (MANIFEST_NAME, LOCK_NAME, *skip) or name.startswith(".") and ".tmp" in name:
            continue
        out.append(p)
    return out


def write_manifest(root: str | os.PathLike, *, kind: str, skip: tuple[str, ...] = (),
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file under ``root`` and write the manifest atomically (call when all are flushed)."""
    from dflash_gptoss.cache_format import write_json_atomic

    root = Path(root)
    files = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in listed_files(root, skip)}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": kind, "algorithm": "sha256",
                "files": files, "total_bytes": sum(f["size"] for f in files.values()), **(extra or {})}
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(root: str | os.PathLike, *, what: str) -> dict[str, Any]:
    """The manifest of ``root``; IntegrityError when absent or unreadable (``what`` names the folder's role)."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise IntegrityError(f"{what} {root} has no {MANIFEST_NAME}: its writer did not finish (killed, disk "
                             "full, or written by an older version of this project).")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path} is unreadable ({e}).") from e
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise IntegrityError(f"{path} is not a {MANIFEST_FORMAT} file.")
    return manifest


def verify_manifest(root: str | os.PathLike, *, what: str, check: str = "full", skip: tuple[str, ...] = (),
                    progress: bool = False) -> dict[str, Any]:
    """Compare ``root`` with its manifest at depth ``check`` ("size" or "full"); IntegrityError names the file.

    Files present but not listed are refused too (a half-copied newer file, a stray shard): the manifest
    is the complete list.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}.")
    root = Path(root)
    manifest = read_manifest(root, what=what)
    files: dict[str, dict[str, Any]] = manifest["files"]
    for rel, rec in files.items():
        p = root / rel
        if not p.is_file():
            raise IntegrityError(f"{what} {root}: {rel} is missing (the manifest lists it, {rec['size']} bytes).")
        size = p.stat().st_size
        if size != rec["size"]:
            raise IntegrityError(f"{what} {root}: {rel} has {size} bytes, the manifest says {rec['size']} "
                                 "(truncated or overwritten).")
    unlisted = [rel for rel in (str(p.relative_to(root)) for p in listed_files(root, skip)) if rel not in files]
    if unlisted:
        raise IntegrityError(f"{what} {root}: {unlisted[:3]} {'are' if len(unlisted) > 1 else 'is'} not in its "
                             f"manifest (written after it was finished, or copied in from elsewhere).")
    if check == "full":
        from tqdm.auto import tqdm

        with tqdm(total=manifest.get("total_bytes", 0), unit="B", unit_scale=True, disable=not progress,
                  desc=f"verifying {root.name}") as bar:
            for rel, rec in files.items():
                if file_sha256(root / rel, bar.update) != rec["sha256"]:
                    raise IntegrityError(f"{what} {root}: {rel} does not match its checksum (bytes changed after "
                                         "it was written).")
    return manifest


# ------------------------------------------------------------------------------- teacher identity
def _safetensors_header(f: Any, path: Path) -> tuple[bytes, int]:
    head = f.read(8)
    if len(head) != 8:
        raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
    (n,) = struct.unpack("<Q", head)
    header = f.read(n)
    if len(header) != n:
        raise ValueError(f"{path} is truncated inside its safetensors header.")
    return header, 8 + n


def weights_fingerprint(snapshot_dir: str | os.PathLike) -> str:
    """sha256 over every ``*.safetensors`` file's name, size, header and three data samples (module doc)."""
    root = Path(snapshot_dir)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{root} holds no *.safetensors weights to fingerprint.")
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            header, start = _safetensors_header(f, path)
            h.update(header)
            for offset in sorted({start, start + (size - start) // 2, max(start, size - FINGERPRINT_SAMPLE)}):
                f.seek(offset)
                h.update(f.read(FINGERPRINT_SAMPLE))
    return h.hexdigest()
