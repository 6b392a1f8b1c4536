"""The on-disk format of the teacher cache: names, meta.json schema, sizes, safe writes.

Everything that both the builder (``cache_builder``) and the reader
(``easydel_dflash_cache``) must agree on lives here, once:

* the format name and version (``FORMAT_NAME``, ``FORMAT_VERSION``);
* the two layouts and, for each, the arrays it holds (file name, dtype, shape, meaning);
* the size formula (``cache_nbytes``) and the free-space refusal (``check_free_space``);
* crash safety: atomic JSON writes (tmp + fsync + ``os.replace``), ``.npy`` memmaps whose disk
  blocks are RESERVED before the teacher runs (``posix_fallocate``: a sparse memmap that meets a full
  disk dies of SIGBUS with no message), a progress checkpoint, ``complete: true``, and last of all
  the manifest (``integrity``: every file's size and sha256);
* the reader's checks: meta.json parses (its file and line named when not), its array table agrees
  with its own settings (``ctx_len``, ``num_windows``, ...), every array file has that dtype and shape
  and its full size on disk.

Layouts
-------
``blocks`` (the seed's): one block per window, anchor at the window's end. A window
of ``ctx_len + block_size - 1`` data tokens ``x_0..`` runs through the teacher;
the features of positions ``0..ctx_len-1`` are the context, ``x_{ctx_len}`` is the
anchor and ``target_ids[:, k]`` (k >= 1) is the teacher's argmax at position
``ctx_len + k - 1``, i.e. its greedy token AT position ``ctx_len + k``.

``windows`` (the scalable one): per window of ``ctx_len`` tokens, the features, token
id and greedy label (argmax at ``t`` = greedy token for ``t + 1``) of EVERY position,
so a trainer samples many anchors per window (see ``window_block_target_ids`` in
``easydel_dflash_cache``). ``--num-blocks`` counts windows in this layout. A ``response``
flag per position marks the tokens a draft may learn to propose: data documents may carry
a ``prompt_len`` (the teacher-generated data does; so can chat data), and a prompt's tokens
are context only, never anchors or labels (docs/design.md, "How DFlash works": on chat data
only the assistant's tokens are anchors/labels). In ``blocks`` the builder only draws windows whose whole block
(anchor and labels) is response.

Version 2 added the ``response`` array; version 3 the manifest and the teacher's identity (its config
and a fingerprint of its weights, compared by the trainer with ``--teacher-snapshot-dir``). Older
caches must be rebuilt.

bf16 values are stored as uint16 bit patterns (``bf16.to_bf16_bits``) so
``np.load(mmap_mode="r")`` works without a bf16 numpy dtype.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dflash_gptoss.cache_settings import LAYOUTS

FORMAT_NAME = "dflash-gptoss-teacher-cache"
FORMAT_VERSION = 3

META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
WINDOW_OFFSETS_FILE = "window_offsets.npy"

# Upper bound of one .npy header (numpy pads headers to a multiple of 64 bytes; the cache's are < 128).
NPY_HEADER_BYTES = 128
# Generous upper bound for meta.json + progress.json, so the size check never under-counts.
JSON_OVERHEAD_BYTES = 64 * 1024


class CacheFormatError(ValueError):
    """A cache directory is not what the caller expects (missing, incomplete, other format)."""


class InsufficientSpaceError(ValueError):
    """The cache would not fit on the target filesystem."""


@dataclass(frozen=True)
class ArraySpec:
    """One array of the cache: where it lives and what it means."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    meaning: str
    bf16_bits: bool = False

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "encoding": "bf16_bits" if self.bf16_bits else "raw",
            "meaning": self.meaning,
        }


def window_len(layout: str, ctx_len: int, block_size: int) -> int:
    """Tokens run through the teacher per window (the positions the model must support)."""
    _check_layout(layout)
    return ctx_len + block_size - 1 if layout == "blocks" else ctx_len


def trainable_blocks(response: np.ndarray, anchors: np.ndarray, block_size: int) -> np.ndarray:
    """Whether a block anchored at each position of ``anchors`` may be trained on (the one rule).

    True when ``response[..., n .. n+B-2]`` are all nonzero: the anchor and every token the block's
    labels are conditioned on are the teacher's own text, so each label is its greedy continuation,
    as at inference. ``response`` is ``[..., T]``; the result is ``[..., len(anchors)]``. The caller
    keeps ``n + B - 1 <= T``.
    """
    r = np.asarray(response)
    zeros = np.zeros(r.shape[:-1] + (1,), dtype=np.int64)
    prompt_before = np.concatenate([zeros, np.cumsum(r == 0, axis=-1, dtype=np.int64)], axis=-1)
    anchors = np.asarray(anchors)
    return prompt_before[..., anchors + block_size - 1] == prompt_before[..., anchors]


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")


def array_specs(
    layout: str, *, num_windows: int, ctx_len: int, block_size: int, num_context_features: int, hidden_size: int
) -> dict[str, ArraySpec]:
    """The arrays of a cache, by name. ``num_windows`` equals the number of blocks in ``blocks``."""
    _check_layout(layout)
    W, C, B, H = int(num_windows), int(ctx_len), int(block_size), int(hidden_size)
    KH = int(num_context_features) * H
    offsets = ArraySpec(
        "window_offsets",
        WINDOW_OFFSETS_FILE,
        "int64",
        (W,),
        "start of each window in the concatenated token stream (provenance; seeded sampling)",
    )
    if layout == "blocks":
        specs = [
            ArraySpec(
                "context_features",
                "context_features_u16.npy",
                "uint16",
                (W, C, KH),
                "teacher features (target_layer_ids outputs concatenated) of context positions 0..ctx_len-1",
                bf16_bits=True,
            ),
            ArraySpec(
                "anchor_embedding",
                "anchor_embedding_u16.npy",
                "uint16",
                (W, H),
                "teacher's input embedding row of each block's anchor token (position ctx_len)",
                bf16_bits=True,
            ),
            ArraySpec(
                "target_ids",
                "target_ids.npy",
                "int32",
                (W, B),
                "column 0: anchor token (position ctx_len); column k>=1: teacher argmax at position "
                "ctx_len+k-1 (its greedy token AT position ctx_len+k) under teacher forcing on the data",
            ),
            offsets,
        ]
    else:
        specs = [
            ArraySpec(
                "features",
                "features_u16.npy",
                "uint16",
                (W, C, KH),
                "teacher features (target_layer_ids outputs concatenated) of every position 0..ctx_len-1",
                bf16_bits=True,
            ),
            ArraySpec("token_ids", "token_ids.npy", "int32", (W, C), "data token at every position"),
            ArraySpec(
                "labels",
                "labels.npy",
                "int32",
                (W, C),
                "teacher argmax at position t (its greedy token for position t+1) under teacher forcing",
            ),
            ArraySpec(
                "response",
                "response_u8.npy",
                "uint8",
                (W, C),
                "1 where the data token is response text (a valid anchor / label target), 0 inside a prompt",
            ),
            offsets,
        ]
    return {s.name: s for s in specs}


def all_array_files() -> set[str]:
    """Every array file name of every layout (what ``overwrite`` may delete)."""
    files: set[str] = set()
    for layout in LAYOUTS:
        specs = array_specs(layout, num_windows=1, ctx_len=1, block_size=2, num_context_features=1, hidden_size=1)
        files |= {s.file for s in specs.values()}
    return files


def size_formula(layout: str) -> str:
    """The size formula in words, printed when the size check refuses."""
    _check_layout(layout)
    if layout == "blocks":
        return "blocks * (ctx_len*K*H*2 + H*2 + block_size*4 + 8) bytes (+ headers)"
    return "windows * (ctx_len*K*H*2 + ctx_len*(4*2+1) + 8) bytes (+ headers)"


def size_details(
    layout: str, *, num_windows: int, ctx_len: int, block_size: int, num_context_features: int, hidden_size: int
) -> str:
    """The size formula with this build's numbers filled in (for the refusal message)."""
    C, B, K, H = ctx_len, block_size, num_context_features, hidden_size
    per = f"{C}*{K}*{H}*2 + {H}*2 + {B}*4 + 8" if layout == "blocks" else f"{C}*{K}*{H}*2 + {C}*(4*2 + 1) + 8"
    n = cache_nbytes(layout, num_windows=num_windows, ctx_len=C, block_size=B, num_context_features=K, hidden_size=H)
    return f"{num_windows} * ({per}) + headers = {n} bytes"


def cache_nbytes(
    layout: str, *, num_windows: int, ctx_len: int, block_size: int, num_context_features: int, hidden_size: int
) -> int:
    """Bytes the finished cache occupies: arrays + one .npy header each + JSON files (upper bound)."""
    specs = array_specs(
        layout,
        num_windows=num_windows,
        ctx_len=ctx_len,
        block_size=block_size,
        num_context_features=num_context_features,
        hidden_size=hidden_size,
    )
    return sum(s.nbytes + NPY_HEADER_BYTES for s in specs.values()) + JSON_OVERHEAD_BYTES


def bytes_per_window(specs: dict[str, ArraySpec]) -> int:
    """Array bytes one window (= one block in ``blocks`` layout) costs, headers excluded."""
    num_windows = next(iter(specs.values())).shape[0]
    return sum(s.nbytes for s in specs.values()) // max(int(num_windows), 1)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes_at(path: str | os.PathLike) -> int:
    """Free bytes of the filesystem that holds ``path`` (or its nearest existing parent)."""
    return int(shutil.disk_usage(_existing_parent(Path(path))).free)


def allocated_bytes(files: list[Path]) -> int:
    """Disk blocks already used by ``files`` (sparse memmaps count only what was written)."""
    total = 0
    for f in files:
        if f.exists():
            st = f.stat()
            total += int(getattr(st, "st_blocks", 0)) * 512 or st.st_size
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    raise AssertionError("unreachable")


def check_free_space(
    out_dir: str | os.PathLike,
    needed: int,
    *,
    layout: str,
    details: str,
    reclaimable: int = 0,
    free_bytes: int | None = None,
) -> int:
    """Refuse (``InsufficientSpaceError``) when ``needed`` bytes do not fit at ``out_dir``.

    ``reclaimable`` counts bytes this build reuses or deletes (an interrupted build's
    files on ``resume``, an old cache on ``overwrite``). ``free_bytes`` replaces the
    measured free space (to test the check, or for filesystems that misreport).
    Returns the free bytes used for the decision.
    """
    free = free_bytes_at(out_dir) if free_bytes is None else int(free_bytes)
    if needed > free + reclaimable:
        raise InsufficientSpaceError(
            f"the cache needs {human_bytes(needed)} ({needed} bytes) but {out_dir} has only "
            f"{human_bytes(free)} ({free} bytes) free"
            + (f" (+ {reclaimable} bytes reused from the existing cache)" if reclaimable else "")
            + f". Size = {size_formula(layout)} = {details}. "
            "Reduce --num-blocks or --ctx-len, use --layout windows (one window serves many blocks), "
            "or choose an --out-dir with more space."
        )
    return free


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so a crash leaves either the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def settings_of(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of meta.json that identifies a build (everything but its state and what it measured)."""
    return {k: v for k, v in meta.items() if k not in ("complete", "created_unix", "feature_stats")}


def settings_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable keys where two settings dicts differ (recursing into dicts)."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += settings_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out


def reserve_disk(paths: list[Path]) -> None:
    """Give every byte of these (sparse) files real disk blocks now, or fail naming the file.

    ``open_memmap`` makes sparse files, so without this the space is taken page by page while the
    teacher runs and a disk that fills meanwhile kills the build with SIGBUS ("Bus error", no message).
    ``posix_fallocate`` either reserves every block or raises ENOSPC at once. Idempotent: on resume it
    only fills the holes left.
    """
    for path in paths:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate there (some network filesystems)
                continue
            raise InsufficientSpaceError(
                f"could not reserve {human_bytes(os.fstat(fd).st_size)} on disk for {path} ({e.strerror}; "
                f"{human_bytes(free_bytes_at(path))} free there): the filesystem cannot hold the cache. Free space "
                "or choose an --out-dir with more space.") from e
        finally:
            os.close(fd)


def create_memmaps(out_dir: Path, specs: dict[str, ArraySpec]) -> dict[str, np.memmap]:
    """Create every array as a .npy memmap with its disk space reserved (:func:`reserve_disk`).

    When the reservation fails, the files just created are removed again (nothing half-made is left).
    """
    arrays = {name: np.lib.format.open_memmap(out_dir / s.file, mode="w+", dtype=np.dtype(s.dtype), shape=s.shape)
              for name, s in specs.items()}
    try:
        reserve_disk([out_dir / s.file for s in specs.values()])
    except InsufficientSpaceError:
        del arrays
        for s in specs.values():
            (out_dir / s.file).unlink(missing_ok=True)
        raise
    return arrays


def open_memmaps(out_dir: Path, specs: dict[str, ArraySpec], mode: str = "r") -> dict[str, np.ndarray]:
    """Open existing arrays and check their dtype/shape against ``specs`` (``mode`` "r" or "r+")."""
    arrays: dict[str, np.ndarray] = {}
    for name, s in specs.items():
        path = out_dir / s.file
        if not path.exists():
            raise CacheFormatError(f"{path} is missing; the cache is damaged (meta.json lists it).")
        try:
            arr = np.load(path, mmap_mode=mode)
        except (ValueError, OSError, EOFError) as e:
            size = path.stat().st_size
            raise CacheFormatError(
                f"{path} is damaged: {size} bytes on disk where {s.dtype} {tuple(s.shape)} needs {s.nbytes} bytes "
                f"of data plus its header ({e}). Rebuild the cache (or copy that file again).") from e
        if arr.dtype != np.dtype(s.dtype) or tuple(arr.shape) != tuple(s.shape):
            raise CacheFormatError(
                f"{path} holds {arr.dtype} {tuple(arr.shape)}, meta.json says {s.dtype} {tuple(s.shape)}."
            )
        arrays[name] = arr
    return arrays


def specs_from_meta(meta: dict[str, Any]) -> dict[str, ArraySpec]:
    """The ArraySpecs a meta.json describes."""
    return {
        name: ArraySpec(
            name,
            d["file"],
            d["dtype"],
            tuple(int(x) for x in d["shape"]),
            d.get("meaning", ""),
            bf16_bits=d.get("encoding") == "bf16_bits",
        )
        for name, d in meta["arrays"].items()
    }


def read_meta(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a cache dir, checked for format name and version, and its array table against its own
    settings (not for completeness)."""
    path = Path(cache_dir) / META_FILE
    if not path.is_file():
        raise CacheFormatError(f"{cache_dir} is not a teacher cache: {META_FILE} not found.")
    try:
        meta = read_json(path)
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); the cache's description "
                               "is damaged: rebuild the cache.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CacheFormatError(f"{path} is unreadable ({e}); rebuild the cache.") from e
    if not isinstance(meta, dict):
        raise CacheFormatError(f"{path} holds a {type(meta).__name__}, not a JSON object; rebuild the cache.")
    if meta.get("format") != FORMAT_NAME:
        raise CacheFormatError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT_NAME!r}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheFormatError(
            f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
            "rebuild the cache with this version of scripts/tpu_dflash_build_teacher_cache.py."
        )
    check_meta_consistent(meta, path)
    return meta


def check_meta_consistent(meta: dict[str, Any], path: str | os.PathLike = META_FILE) -> None:
    """meta.json's array table must be exactly what its settings imply (an edited ``ctx_len`` or
    ``num_windows`` would otherwise surface as a broadcast error deep inside training)."""
    try:
        want = array_specs(meta["layout"], num_windows=int(meta["num_windows"]), ctx_len=int(meta["ctx_len"]),
                           block_size=int(meta["block_size"]),
                           num_context_features=int(meta["num_context_features"]),
                           hidden_size=int(meta["teacher"]["hidden_size"]))
        have = specs_from_meta(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CacheFormatError(f"{path}: a required entry is missing or malformed ({e!r}); rebuild the cache.") from e
    problems = [f"{name}: {have[name].dtype} {have[name].shape} in 'arrays', settings imply {s.dtype} {s.shape}"
                for name, s in want.items()
                if name in have and (have[name].dtype, have[name].shape) != (s.dtype, s.shape)]
    missing = sorted(set(want) - set(have))
    if missing or problems:
        raise CacheFormatError(
            f"{path} contradicts itself (settings ctx_len={meta['ctx_len']}, num_windows={meta['num_windows']}, "
            f"block_size={meta['block_size']}): " + "; ".join(problems + [f"{m} missing" for m in missing])
            + ". It was edited or is damaged: rebuild the cache.")


def read_progress(cache_dir: str | os.PathLike) -> int:
    """Windows already written and flushed by an interrupted build (0 if none)."""
    path = Path(cache_dir) / PROGRESS_FILE
    return int(read_json(path)["windows_done"]) if path.is_file() else 0


def write_progress(cache_dir: str | os.PathLike, windows_done: int, num_windows: int) -> None:
    """Checkpoint: call only after the arrays up to ``windows_done`` are flushed."""
    write_json_atomic(
        Path(cache_dir) / PROGRESS_FILE, {"windows_done": int(windows_done), "num_windows": int(num_windows)}
    )


def mark_complete(cache_dir: str | os.PathLike, meta: dict[str, Any]) -> dict[str, Any]:
    """The last writes of a build: meta.json with ``complete: true``, then the manifest (both atomic)."""
    from dflash_gptoss.run_safety.integrity import write_manifest

    done = dict(meta, complete=True)
    write_json_atomic(Path(cache_dir) / META_FILE, done)
    write_manifest(cache_dir, kind="teacher-cache")
    return done


def verify_cache_files(cache_dir: str | os.PathLike, check: str = "size", *, progress: bool = False) -> None:
    """A complete cache against its manifest (``integrity.verify_manifest``), as a CacheFormatError."""
    from dflash_gptoss.run_safety.integrity import IntegrityError, verify_manifest

    try:
        verify_manifest(cache_dir, what="teacher cache", check=check, progress=progress)
    except IntegrityError as e:
        raise CacheFormatError(f"{e} Rebuild it with --overwrite (or copy it again).") from e
