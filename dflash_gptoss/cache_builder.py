"""Build the teacher cache: validate everything, then run the JAX teacher once and write.

Order matters because the teacher is the expensive part: ``plan_teacher_cache``
checks the snapshot, the layer-id rule, the window length against the model and
the data, the out-dir's state and the size against free space, all without
importing jax; only then is the teacher loaded.

Windows (``cache_input``): the data (JSONL documents, or the tiny teacher's corpus) is one
token stream with EOS after every document. Window ``i`` starts at offset ``o_i`` drawn
uniformly from ``[0, N - window_len]`` by ``np.random.default_rng(seed)``; windows
may overlap and cross document boundaries (as in pretraining-style packing). The
offsets are stored in ``window_offsets.npy`` so any row can be traced to its data.

Nothing lost: one build per out-dir (``run_safety/job_lock``), the arrays' disk space reserved before the
teacher loads (``open_out_dir``), ``complete`` and then the manifest written last.

Throughput: the teacher forward runs on the main thread; converting to bf16 and
writing the memmaps happens on a writer thread, so the next forward is dispatched
while the previous chunk is written (the teacher releases the GIL while it waits for
the device). Progress is checkpointed after every flushed chunk, and a build resumed
with the same settings continues from the checkpoint with the same chunk boundaries
(so the result is byte-identical to an uninterrupted build).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dflash_gptoss.cache_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUTS,
    META_FILE,
    PROGRESS_FILE,
    ArraySpec,
    CacheFormatError,
    all_array_files,
    allocated_bytes,
    array_specs,
    cache_nbytes,
    check_free_space,
    create_memmaps,
    mark_complete,
    open_memmaps,
    read_json,
    read_progress,
    reserve_disk,
    settings_diff,
    settings_of,
    size_details,
    verify_cache_files,
    window_len,
    write_json_atomic,
    write_progress,
)
from dflash_gptoss.cache_input import (
    DEFAULT_DATA,
    CacheBuildError,
    blocks_allowed_starts,
    load_token_stream,
    window_offsets,
)
from dflash_gptoss.cache_settings import DTYPES, CacheBuildSettings
from dflash_gptoss.cache_writer import Chunk, ChunkWriter, RowFile, flush_arrays
from dflash_gptoss.cli_types import check_positive_int, setting_default
from dflash_gptoss.draft_config import target_layer_ids
from dflash_gptoss.run_safety import stop_signals
from dflash_gptoss.run_safety.integrity import MANIFEST_NAME
from dflash_gptoss.run_safety.job_lock import LOCK_NAME, DirLock, LockHeldError, acquire_for_job


@dataclass
class BuildPlan:
    """Everything a build needs, validated; produced without touching jax."""

    out_dir: Path
    snapshot_dir: Path
    layout: str
    ctx_len: int
    block_size: int
    layer_ids: list[int]
    num_windows: int
    batch_size: int
    dp: int
    tp: int
    dtype: str
    tokens: np.ndarray
    response: np.ndarray  # uint8 per token of ``tokens``: 0 inside a prompt
    offsets: np.ndarray
    specs: dict[str, ArraySpec]
    meta: dict[str, Any]
    nbytes: int
    start_window: int = 0
    already_complete: bool = False
    stale_files: list[Path] = field(default_factory=list)
    lock: DirLock | None = None  # the out-dir's writer lock (process 0), held until the build ends
    created_out_dir: bool = False  # the plan made the out-dir (a refusal before any write removes it again)

    @property
    def window_len(self) -> int:
        return window_len(self.layout, self.ctx_len, self.block_size)


@dataclass
class BuildResult:
    out_dir: Path
    windows_written: int
    tokens_processed: int
    seconds: float
    meta: dict[str, Any]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_processed / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------- validation
def read_teacher_config(snapshot_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a GPT-OSS snapshot (all a plan needs); a build checks the rest in ``plan_teacher_cache``."""
    from dflash_gptoss.teacher_snapshot import SnapshotError, read_config

    try:
        return read_config(snapshot_dir)  # parses (naming line and column), GPT-OSS, the sizes the cache needs
    except SnapshotError as e:
        raise CacheBuildError(str(e)) from e


def _check_settings(
    *, layout: str, ctx_len: int, block_size: int, num_blocks: int, batch_size: int, dp: int, tp: int, dtype: str
) -> None:
    if layout not in LAYOUTS:
        raise CacheBuildError(f"--layout must be one of {LAYOUTS}, got {layout!r}.")
    if dtype not in DTYPES:
        raise CacheBuildError(f"--dtype must be one of {DTYPES}, got {dtype!r}.")
    for name, value in {"ctx_len": ctx_len, "num_blocks": num_blocks, "batch_size": batch_size, "dp": dp,
                        "tp": tp}.items():
        check_positive_int(name, value, CacheBuildError)
    if block_size < 2:
        raise CacheBuildError(f"block_size must be >= 2 (an anchor and at least one proposal), got {block_size}.")
    if batch_size % dp:
        raise CacheBuildError(
            f"--batch-size {batch_size} is not divisible by --dp {dp}: every forward splits its windows "
            f"evenly over the dp axis; use a multiple of {dp}."
        )
    if layout == "windows" and ctx_len < block_size:
        raise CacheBuildError(
            f"layout 'windows' needs ctx_len >= block_size so a block fits in a window, got {ctx_len} < {block_size}."
        )


def _layer_ids(cfg: dict[str, Any], num_context_features: int) -> list[int]:
    try:
        return target_layer_ids(int(cfg["num_hidden_layers"]), int(num_context_features))
    except ValueError as e:
        raise CacheBuildError(f"--num-context-features {num_context_features}: {e}") from e


def _check_model_positions(cfg: dict[str, Any], layout: str, ctx_len: int, block_size: int) -> None:
    limit = cfg.get("max_position_embeddings")
    need = window_len(layout, ctx_len, block_size)
    if limit is not None and need > int(limit):
        raise CacheBuildError(
            f"each window runs {need} tokens through the teacher (ctx_len + block_size - 1 = {ctx_len} + "
            f"{block_size} - 1 in layout {layout!r}) but the model supports max_position_embeddings={limit}."
        )


# --------------------------------------------------------------------------- out dir
def _known_files(out_dir: Path) -> list[Path]:
    names = all_array_files() | {META_FILE, PROGRESS_FILE, MANIFEST_NAME}
    return [out_dir / n for n in sorted(names) if (out_dir / n).exists()]


def _is_empty(out_dir: Path) -> bool:
    """No file but (maybe) this build's own lock: a fresh out-dir."""
    return not out_dir.exists() or all(p.name == LOCK_NAME for p in out_dir.iterdir())


def _inspect_out_dir(
    out_dir: Path, meta: dict[str, Any], *, resume: bool, overwrite: bool
) -> tuple[int, bool, list[Path]]:
    """(start window, already complete, files to delete) for this out-dir, or refuse."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CacheBuildError(f"--out-dir {out_dir} exists and is not a directory.")
    nearest = out_dir if out_dir.exists() else next(p for p in out_dir.parents if p.exists())
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise CacheBuildError(f"--out-dir {out_dir}: {nearest} is not writable.")
    if _is_empty(out_dir):
        return 0, False, []
    ours = _known_files(out_dir)
    if overwrite:
        return 0, False, ours
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        raise CacheBuildError(
            f"--out-dir {out_dir} is not empty and holds no teacher cache ({META_FILE} missing); "
            "choose an empty or new directory (or pass --overwrite to replace the cache files in it)."
        )
    try:
        old = read_json(meta_path)
    except (OSError, ValueError) as e:
        raise CacheBuildError(f"{meta_path} is unreadable ({e}); pass --overwrite to rebuild.") from e
    diff = settings_diff(settings_of(old), settings_of(meta))
    if diff:
        raise CacheBuildError(
            f"--out-dir {out_dir} holds a DIFFERENT cache ("
            + "; ".join(diff[:8])
            + (" ..." if len(diff) > 8 else "")
            + "). "
            + ("--resume needs the same settings as the interrupted build. " if resume else "")
            + "Pass --overwrite to replace it, or choose another --out-dir."
        )
    if old.get("complete"):
        if resume:
            try:
                verify_cache_files(out_dir, "size")
            except CacheFormatError as e:
                raise CacheBuildError(f"--out-dir {out_dir} is marked complete but is damaged: {e}") from e
            return int(meta["num_windows"]), True, []
        raise CacheBuildError(
            f"--out-dir {out_dir} already holds this cache, complete. Pass --overwrite to rebuild it."
        )
    if not resume:
        raise CacheBuildError(
            f"--out-dir {out_dir} holds an interrupted build of this cache ({read_progress(out_dir)} of "
            f"{meta['num_windows']} windows done). Pass --resume to continue it or --overwrite to start over."
        )
    return read_progress(out_dir), False, []


# --------------------------------------------------------------------------- plan
def _build_meta(
    *,
    cfg: dict[str, Any],
    snapshot_dir: Path,
    layout: str,
    ctx_len: int,
    block_size: int,
    layer_ids: list[int],
    num_windows: int,
    specs: dict[str, ArraySpec],
    data_source: str,
    tokens: np.ndarray,
    seed: int,
    batch_size: int,
    dp: int,
    tp: int,
    dtype: str,
    nbytes: int,
) -> dict[str, Any]:
    """meta.json (with ``complete: false``); every key but ``complete``/``created_unix`` identifies the build."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "created_unix": int(time.time()),
        "layout": layout,
        "teacher": {
            "snapshot_dir": str(snapshot_dir),
            "weights_fingerprint": _fingerprint(snapshot_dir),
            "config": cfg,
            "model_type": cfg["model_type"],
            "hidden_size": int(cfg["hidden_size"]),
            "vocab_size": int(cfg["vocab_size"]),
            "num_hidden_layers": int(cfg["num_hidden_layers"]),
            "max_position_embeddings": cfg.get("max_position_embeddings"),
        },
        "target_layer_ids": layer_ids,
        "num_context_features": len(layer_ids),
        "ctx_len": ctx_len,
        "block_size": block_size,
        "window_len": window_len(layout, ctx_len, block_size),
        "anchor_position": ctx_len if layout == "blocks" else None,
        "num_windows": num_windows,
        "num_blocks": num_windows if layout == "blocks" else None,
        "arrays": {name: s.to_json() for name, s in specs.items()},
        "data": {
            "source": data_source,
            "num_tokens": int(tokens.size),
            "tokens_sha256": hashlib.sha256(np.ascontiguousarray(tokens)).hexdigest(),  # no copy of a memmap
            "window_sampling": "window i starts at offset i of np.random.default_rng(seed).integers("
            "0, num_tokens - window_len + 1, size=num_windows); documents joined with EOS",
        },
        "seed": seed,
        "build": {"batch_size": batch_size, "dp": dp, "tp": tp, "dtype": dtype},
        "nbytes": nbytes,
    }


def check_build_geometry(model_snapshot_dir: str | os.PathLike, *, layout: str, ctx_len: int, block_size: int,
                         num_context_features: int, num_blocks: int, batch_size: int, dp: int, tp: int,
                         dtype: str) -> tuple[dict[str, Any], list[int]]:
    """The checks of a build that need neither data nor an out-dir: (config, layer ids).

    :func:`plan_teacher_cache` starts with them; the TPU planner (``--plan-tpu``) runs them alone
    before compiling the teacher's forward.
    """
    _check_settings(layout=layout, ctx_len=ctx_len, block_size=block_size, num_blocks=num_blocks,
                    batch_size=batch_size, dp=dp, tp=tp, dtype=dtype)
    cfg = read_teacher_config(model_snapshot_dir)
    layer_ids = _layer_ids(cfg, num_context_features)
    _check_model_positions(cfg, layout, ctx_len, block_size)
    return cfg, layer_ids


def _fingerprint(snapshot_dir: Path) -> str | None:
    """The teacher's identity (``integrity.weights_fingerprint``); None for a config-only folder (a plan)."""
    from dflash_gptoss.run_safety.integrity import weights_fingerprint

    try:
        return weights_fingerprint(snapshot_dir) if any(snapshot_dir.glob("*.safetensors")) else None
    except ValueError as e:
        raise CacheBuildError(f"--model-snapshot-dir {snapshot_dir}: {e}") from e


_DEFAULT = {name: setting_default(CacheBuildSettings, name) for name in ("layout", "seed", "dp", "tp", "dtype")}
"""The builder's defaults, from its settings (one definition for the flags and the library)."""


def plan_teacher_cache(
    model_snapshot_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ctx_len: int,
    block_size: int,
    num_context_features: int,
    num_blocks: int,
    batch_size: int,
    layout: str = _DEFAULT["layout"],
    data: str | os.PathLike | None = None,
    seed: int = _DEFAULT["seed"],
    dp: int = _DEFAULT["dp"],
    tp: int = _DEFAULT["tp"],
    dtype: str = _DEFAULT["dtype"],
    resume: bool = False,
    overwrite: bool = False,
    free_bytes: int | None = None,
    progress: bool = False,
) -> BuildPlan:
    """Validate every input (no jax, no teacher) and return what the build will do.

    ``num_blocks`` is the number of windows: one block each in ``blocks`` layout,
    many (trainer-sampled) in ``windows`` layout. ``free_bytes`` overrides the measured
    free space of ``out_dir`` (tests; filesystems that misreport).
    """
    if resume and overwrite:
        raise CacheBuildError("--resume and --overwrite contradict each other; pass one.")
    snapshot = Path(model_snapshot_dir).absolute()
    cfg, layer_ids = check_build_geometry(snapshot, layout=layout, ctx_len=ctx_len, block_size=block_size,
                                          num_context_features=num_context_features, num_blocks=num_blocks,
                                          batch_size=batch_size, dp=dp, tp=tp, dtype=dtype)
    tokens, response = load_token_stream(data, snapshot, cfg, progress=progress)  # a bar when tokenizing
    wlen = window_len(layout, ctx_len, block_size)
    if tokens.size < wlen:
        raise CacheBuildError(
            f"the data has {tokens.size} tokens, fewer than one window of {wlen} (ctx_len + block_size - 1 = "
            f"{ctx_len} + {block_size} - 1 in layout {layout!r}); give more data or a shorter --ctx-len."
        )
    H = int(cfg["hidden_size"])
    dims = dict(
        num_windows=num_blocks,
        ctx_len=ctx_len,
        block_size=block_size,
        num_context_features=len(layer_ids),
        hidden_size=H,
    )
    specs = array_specs(layout, **dims)
    nbytes = cache_nbytes(layout, **dims)
    out = Path(out_dir).absolute()
    data_source = DEFAULT_DATA if data is None else str(Path(data).absolute())
    meta = _build_meta(
        cfg=cfg,
        snapshot_dir=snapshot,
        layout=layout,
        ctx_len=ctx_len,
        block_size=block_size,
        layer_ids=layer_ids,
        num_windows=num_blocks,
        specs=specs,
        data_source=data_source,
        tokens=tokens,
        seed=seed,
        batch_size=batch_size,
        dp=dp,
        tp=tp,
        dtype=dtype,
        nbytes=nbytes,
    )
    if out.exists() and not out.is_dir():
        raise CacheBuildError(f"--out-dir {out} exists and is not a directory.")
    existed = out.exists()
    try:
        lock = acquire_for_job(out, "teacher cache build")  # one writer per out-dir, before reading its state
    except (LockHeldError, OSError) as e:
        raise CacheBuildError(f"--out-dir {out}: {e}") from e
    try:
        start, complete, stale = _inspect_out_dir(out, meta, resume=resume, overwrite=overwrite)
        reclaim = allocated_bytes(stale if overwrite else _known_files(out) if out.is_dir() else [])
        if not complete:
            check_free_space(out, nbytes, layout=layout, reclaimable=reclaim, free_bytes=free_bytes,
                             details=size_details(layout, **dims))
    except BaseException:
        if lock is not None:
            lock.release()
        if not existed and _is_empty(out):
            shutil.rmtree(out, ignore_errors=True)  # only this build's lock file: leave no trace of a refused build
        raise
    return BuildPlan(
        created_out_dir=not existed,
        out_dir=out,
        snapshot_dir=snapshot,
        layout=layout,
        ctx_len=ctx_len,
        block_size=block_size,
        layer_ids=layer_ids,
        num_windows=num_blocks,
        batch_size=batch_size,
        dp=dp,
        tp=tp,
        dtype=dtype,
        tokens=tokens,
        response=response,
        offsets=window_offsets(tokens.size, wlen, num_blocks, seed,
                               blocks_allowed_starts(response, wlen, ctx_len, block_size)
                               if layout == "blocks" else None),
        specs=specs,
        meta=meta,
        nbytes=nbytes,
        start_window=start,
        already_complete=complete,
        stale_files=stale,
        lock=lock,
    )


# --------------------------------------------------------------------------- writing
def chunk_input_ids(plan: BuildPlan, start: int) -> tuple[np.ndarray, int]:
    """Token ids ``[batch_size, window_len]`` of the chunk at ``start``; the last chunk is padded
    by repeating its last window (so every forward has one shape), returns (ids, valid rows)."""
    stop = min(start + plan.batch_size, plan.num_windows)
    offs = plan.offsets[start:stop]
    offs = np.concatenate([offs, np.repeat(offs[-1:], plan.batch_size - offs.size)])
    ids = plan.tokens[offs[:, None] + np.arange(plan.window_len)[None, :]]
    return np.ascontiguousarray(ids, dtype=np.int32), stop - start


def all_chunks(plan: BuildPlan, start: int = 0) -> list[int]:
    """Chunk starts: multiples of batch_size, so a resumed build splits the work identically."""
    return list(range(start, plan.num_windows, plan.batch_size))


def prepare_out_dir(plan: BuildPlan) -> dict[str, np.ndarray]:
    """Fresh build: delete stale files, create the arrays with their disk space reserved, then write meta
    (complete: false). Resume: reopen, and reserve whatever space the arrays still lack."""
    if plan.start_window > 0:
        arrays = open_memmaps(plan.out_dir, plan.specs, mode="r+")
        reserve_disk([plan.out_dir / s.file for s in plan.specs.values()])
        return arrays
    for f in plan.stale_files:
        f.unlink()
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    arrays = create_memmaps(plan.out_dir, plan.specs)  # InsufficientSpaceError before any teacher work
    write_json_atomic(plan.out_dir / META_FILE, plan.meta)
    arrays["window_offsets"][:] = plan.offsets
    flush_arrays(arrays)
    write_progress(plan.out_dir, 0, plan.num_windows)
    return arrays


def check_teacher_snapshot(plan: BuildPlan) -> None:
    """The snapshot's weights (every tensor's header) before the out-dir is touched or the teacher loads, so a
    damaged snapshot leaves no cache folder behind. A plan reads ``config.json``, and ``tokenizer.json``
    when its data needs tokenizing (``cache_input``), each through the same validator."""
    from dflash_gptoss.teacher_snapshot import SnapshotError, validate_snapshot

    if plan.already_complete:
        return
    try:
        validate_snapshot(plan.snapshot_dir, tokenizer=False)
    except SnapshotError as e:
        _release(plan)
        if plan.created_out_dir and _is_empty(plan.out_dir):
            shutil.rmtree(plan.out_dir, ignore_errors=True)  # only the plan's lock file: leave no trace
        raise CacheBuildError(str(e)) from e


def load_teacher(plan: BuildPlan) -> Any:
    """The JAX teacher for a plan (the first heavy import of a build)."""
    from dflash_gptoss.teacher_jax import JaxTeacher

    return JaxTeacher(plan.snapshot_dir, plan.layer_ids, dp=plan.dp, tp=plan.tp, dtype=plan.dtype)


def _check_teacher(plan: BuildPlan, teacher: Any) -> None:
    if [int(i) for i in teacher.layer_ids] != plan.layer_ids:
        raise CacheBuildError(
            f"the given teacher extracts layers {teacher.layer_ids}, the plan needs {plan.layer_ids}."
        )
    if int(teacher.config.hidden_size) != plan.meta["teacher"]["hidden_size"]:
        raise CacheBuildError("the given teacher's hidden size differs from the snapshot's config.json.")


def _check_output_shapes(plan: BuildPlan, features: np.ndarray, labels: np.ndarray, rows: int | None = None) -> None:
    rows = plan.batch_size if rows is None else rows
    want = (rows, plan.window_len, len(plan.layer_ids) * plan.meta["teacher"]["hidden_size"])
    if tuple(features.shape) != want or tuple(labels.shape) != want[:2]:
        raise RuntimeError(f"teacher returned features {features.shape} / labels {labels.shape}, expected {want}.")


# --------------------------------------------------------------------------- multi-host
def _agree_across_processes(plan: BuildPlan) -> None:
    """Every process planned the same build from the same out-dir state (else: no shared filesystem)."""
    from jax.experimental import multihost_utils

    mine = np.array([plan.start_window, int(plan.already_complete), plan.num_windows], dtype=np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
    if not (every == every[0]).all():
        raise CacheBuildError(
            f"the processes see different states of --out-dir {plan.out_dir} (start window, complete, windows "
            f"per process: {every.tolist()}); every host must see the same out-dir on a shared filesystem.")


def _prepare_shared(plan: BuildPlan) -> dict[str, Any]:
    """Past one process: process 0 prepares the out-dir (as one process would), then every process
    opens the arrays for positional writes of its own rows."""
    from jax.experimental import multihost_utils

    from dflash_gptoss.distributed import is_main_process, sync

    sync("dflash-cache-planned")  # every process has read the out-dir before process 0 changes it
    if is_main_process():
        flush_arrays(prepare_out_dir(plan))
    sync("dflash-cache-prepared")
    error = None
    try:
        open_memmaps(plan.out_dir, plan.specs, mode="r")  # dtype/shape check
        arrays = {name: RowFile(plan.out_dir / spec.file, spec) for name, spec in plan.specs.items()}
    except (OSError, ValueError) as e:
        error, arrays = e, {}
    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
    if failed.any():
        raise CacheBuildError(
            f"processes {np.flatnonzero(failed).tolist()} cannot open the cache files process 0 created in "
            f"--out-dir {plan.out_dir}" + (f" ({error})" if error else "") + "; every host must see the same "
            "out-dir on a shared filesystem.")
    return arrays


def _checkpoint_shared(plan: BuildPlan, writer: ChunkWriter, end: int) -> None:
    """Past one process: once EVERY process has written and flushed its rows below ``end``,
    process 0 records the progress checkpoint."""
    from dflash_gptoss.distributed import is_main_process, sync

    writer.wait_written(end)
    sync(f"dflash-cache-rows-{end}")
    if is_main_process():
        write_progress(plan.out_dir, end, plan.num_windows)


def open_out_dir(plan: BuildPlan) -> dict[str, Any] | None:
    """Create (or reopen) the cache's arrays with their disk space reserved: call BEFORE loading the
    teacher, so a disk that cannot hold the cache is refused before any expensive work. None when the
    cache is already complete. Past one process every process calls it (process 0 creates the files)."""
    from dflash_gptoss.distributed import is_multiprocess

    multi = is_multiprocess()
    if multi:
        _agree_across_processes(plan)
    if plan.already_complete:
        return None
    return _prepare_shared(plan) if multi else prepare_out_dir(plan)


def run_plan(plan: BuildPlan, teacher: Any, *, progress: bool = True,
             arrays: dict[str, Any] | None = None) -> BuildResult:
    """Run the teacher over the remaining chunks and write them; mark the cache complete last.

    ``arrays`` are :func:`open_out_dir`'s (opened here when not given). Past one process (JAX
    multi-controller, :mod:`dflash_gptoss.distributed`) every process runs this with the same plan:
    the forward runs on the global mesh, each process feeds and writes only its own rows of every
    chunk into the shared out-dir, and process 0 alone creates the files, checkpoints progress
    (after a barrier) and marks the cache complete.
    """
    from tqdm.auto import tqdm

    from dflash_gptoss.distributed import is_main_process, is_multiprocess, sync

    multi = is_multiprocess()
    if arrays is None:
        arrays = open_out_dir(plan)
    if plan.already_complete:
        _release(plan)
        return BuildResult(plan.out_dir, 0, 0, 0.0, read_json(plan.out_dir / META_FILE))
    _check_teacher(plan, teacher)
    unit = "block" if plan.layout == "blocks" else "window"
    bar = tqdm(
        total=plan.num_windows,
        initial=plan.start_window,
        unit=unit,
        disable=not progress or not is_main_process(),
        desc=f"teacher cache ({plan.layout})",
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    done = [0]

    def on_chunk(n: int) -> None:
        done[0] += n
        bar.update(n)
        bar.set_postfix(tok_s=f"{done[0] * plan.window_len / max(time.perf_counter() - t0, 1e-9):.0f}")

    writer = ChunkWriter(plan, arrays, on_chunk, checkpoint=not multi)
    totals = FeatureTotals(plan.num_windows, len(plan.layer_ids))
    pending = None  # multi-host: end of the last chunk handed to the writer, not yet checkpointed
    try:
        for start in all_chunks(plan, plan.start_window):
            if not multi and (flag := stop_signals.requested()) is not None:
                writer.close()  # every chunk handed over is written, flushed and recorded in the progress file
                raise stop_signals.StopRequested(
                    flag.signum, f"after window {start} of {plan.num_windows}",
                    f"the {start} windows done are written and recorded in {plan.out_dir} (incomplete, resumable).")
            ids, valid = chunk_input_ids(plan, start)
            if multi:
                lo, features, labels, stats = teacher.forward_owned(ids, with_stats=True)
                ids = ids[lo: lo + len(features)]
            else:
                lo, (features, labels, stats) = 0, teacher.forward(ids, with_stats=True)
            _check_output_shapes(plan, features, labels, rows=len(ids))
            rows = max(0, min(valid - lo, len(ids)))  # the padding of a last chunk is not cache data
            _check_finite(plan, stats[:rows], first_window=start + lo)
            totals.add(stats[:rows], first_window=start + lo)
            emb = teacher.embed(ids[:, plan.ctx_len]) if plan.layout == "blocks" else None
            if pending is not None:  # the previous chunk was written while this forward ran
                _checkpoint_shared(plan, writer, pending)
            writer.put(Chunk(start + lo, max(0, min(valid - lo, len(ids))), ids, features, labels, emb,
                              end=start + valid, count=valid))
            pending = start + valid if multi else None
        if pending is not None:
            _checkpoint_shared(plan, writer, pending)
    except BaseException:
        _release(plan)  # the cache stays incomplete and resumable; another job may take the folder
        raise
    finally:
        writer.close()
        bar.close()
    seconds = time.perf_counter() - t0
    flush_arrays(arrays)
    if multi:
        for a in arrays.values():
            a.close()
        sync("dflash-cache-written")
        complete_meta = totals.meta(plan)  # a collective: every process
        meta = mark_complete(plan.out_dir, complete_meta) if is_main_process() else None
        sync("dflash-cache-complete")
        meta = meta or read_json(plan.out_dir / META_FILE)
    else:
        meta = mark_complete(plan.out_dir, totals.meta(plan))
    _release(plan)
    return BuildResult(plan.out_dir, done[0], done[0] * plan.window_len, seconds, meta)


class NonFiniteFeaturesError(CacheBuildError):
    """The teacher produced NaN or Inf features: the cache is never marked complete."""


def _check_finite(plan: BuildPlan, stats: np.ndarray, first_window: int) -> None:
    """Refuse a chunk whose features are not finite, naming the first window and the first layer."""
    bad = np.argwhere(stats[..., 0] > 0)
    if bad.size:
        row, layer = (int(x) for x in bad[0])
        raise NonFiniteFeaturesError(
            f"the teacher's features are not finite at window {first_window + row} (target layer "
            f"{plan.layer_ids[layer]}: {int(stats[row, layer, 0])} NaN/Inf values): the snapshot's weights "
            f"({plan.snapshot_dir}) hold NaN or Inf, or --dtype {plan.dtype} overflows. The cache in "
            f"{plan.out_dir} is left incomplete; fix the snapshot (or use --dtype float32), then rebuild with "
            "--overwrite.")


class FeatureTotals:
    """Each window's feature sums per target layer, for ``meta.json``'s ``feature_stats``.

    Kept per window and summed in window order at the end (past one host, after gathering every
    process's windows), so one process and many record the same figures. Windows written by an earlier,
    interrupted run of a resumed build are not re-read: ``windows`` says how many were measured.
    """

    def __init__(self, num_windows: int, num_layers: int) -> None:
        self.per_window = np.full((num_windows, num_layers, 2), np.nan, np.float64)

    def add(self, stats: np.ndarray, first_window: int) -> None:
        self.per_window[first_window: first_window + len(stats)] = stats[..., 1:]

    def meta(self, plan: BuildPlan) -> dict[str, Any]:
        """``plan.meta`` with ``feature_stats``: mean and RMS of each target layer's features (a collective past
        one process: every process calls it)."""
        from dflash_gptoss.distributed import is_multiprocess

        per_window = self.per_window
        if is_multiprocess():
            from jax.experimental import multihost_utils

            gathered = np.asarray(multihost_utils.process_allgather(per_window))  # [processes, W, K, 2]
            per_window = np.where(np.isnan(gathered), -np.inf, gathered).max(axis=0)  # each window has one owner
            per_window[np.isinf(per_window)] = np.nan
        measured = ~np.isnan(per_window[:, 0, 0])
        windows = int(measured.sum())
        sums = per_window[measured].sum(axis=0)  # [K, 2], in window order
        n = max(windows * plan.window_len * int(plan.meta["teacher"]["hidden_size"]), 1)
        layers = [{"layer": int(layer), "mean": float(s / n), "rms": float(np.sqrt(q / n))}
                  for layer, (s, q) in zip(plan.layer_ids, sums, strict=True)]
        return dict(plan.meta, feature_stats={"windows": windows, "per_layer": layers})


def _release(plan: BuildPlan) -> None:
    if plan.lock is not None:
        plan.lock.release()
        plan.lock = None


def build_teacher_cache(
    model_snapshot_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    teacher: Any = None,
    progress: bool = True,
    **settings: Any,
) -> BuildResult:
    """Validate (``plan_teacher_cache``), load the JAX teacher, build the cache.

    ``settings`` are ``plan_teacher_cache``'s keyword arguments. ``teacher`` reuses an
    already loaded ``JaxTeacher`` (same snapshot and layer ids), e.g. to share its
    compiled forward across builds.
    """
    plan = plan_teacher_cache(model_snapshot_dir, out_dir, **settings)
    if teacher is None:
        check_teacher_snapshot(plan)
    arrays = open_out_dir(plan)
    if plan.already_complete:
        return run_plan(plan, None, progress=progress, arrays=arrays)
    return run_plan(plan, teacher if teacher is not None else load_teacher(plan), progress=progress, arrays=arrays)
