"""The cache builder's writing side: teacher output chunks -> the cache's arrays, off the main thread.

Invariant: a chunk's rows are converted to the cache's dtypes (features as bf16 bit patterns),
stored and flushed before the progress checkpoint that counts them is written; so a build killed
at any moment resumes from a checkpoint whose rows are all on disk. Past one host each process
writes only its own rows, with positional writes (:class:`RowFile`).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dflash_gptoss.bf16 import to_bf16_bits
from dflash_gptoss.cache_format import ArraySpec, write_progress

if TYPE_CHECKING:
    from dflash_gptoss.cache_builder import BuildPlan


@dataclass
class Chunk:
    start: int  # first cache row of ``ids``/``features``/``labels`` (this process's rows of the chunk)
    valid: int  # how many of those rows to write (0: another process writes every row of this chunk)
    ids: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    anchor_embedding: np.ndarray | None
    end: int  # the whole chunk's end row: the progress checkpoint once it is written
    count: int  # windows in the whole chunk (progress bar)


def write_chunk(plan: BuildPlan, arrays: dict[str, np.ndarray], c: Chunk) -> None:
    """Convert one teacher output chunk to the cache's dtypes and store it in the memmaps."""
    rows = slice(c.start, c.start + c.valid)
    C, n = plan.ctx_len, c.valid
    if n == 0:
        return
    if plan.layout == "blocks":
        arrays["context_features"][rows] = to_bf16_bits(c.features[:n, :C])
        arrays["anchor_embedding"][rows] = to_bf16_bits(c.anchor_embedding[:n])
        tgt = np.empty((n, plan.block_size), dtype=np.int32)
        tgt[:, 0] = c.ids[:n, C]
        tgt[:, 1:] = c.labels[:n, C : C + plan.block_size - 1]
        arrays["target_ids"][rows] = tgt
    else:
        arrays["features"][rows] = to_bf16_bits(c.features[:n])
        arrays["token_ids"][rows] = c.ids[:n]
        arrays["labels"][rows] = c.labels[:n]
        offs = plan.offsets[c.start: c.start + n]
        arrays["response"][rows] = plan.response[offs[:, None] + np.arange(C)[None, :]]


class RowFile:
    """One preallocated ``.npy`` of a multi-host build, written in place with positional writes.

    Several hosts write disjoint rows of the same file; ``os.pwrite`` sends only those bytes,
    where a memmap would write back whole pages and could overwrite a neighbouring host's rows
    on a network filesystem. ``flush`` is an ``fsync``.
    """

    def __init__(self, path: Path, spec: ArraySpec) -> None:
        self.offset = int(np.load(path, mmap_mode="r").offset)  # after the .npy header
        self.dtype, self.shape = np.dtype(spec.dtype), tuple(spec.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(path, os.O_WRONLY)

    def __setitem__(self, rows: slice, value: np.ndarray) -> None:
        data = np.ascontiguousarray(value, dtype=self.dtype)
        if data.shape != (rows.stop - rows.start, *self.shape[1:]):
            raise ValueError(f"rows {rows} of {self.shape} cannot take an array of shape {data.shape}.")
        view, pos = memoryview(data.reshape(-1).view(np.uint8)), self.offset + rows.start * self.row_bytes
        while view.nbytes:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def flush_arrays(arrays: dict[str, Any]) -> None:
    for a in arrays.values():
        if isinstance(a, (np.memmap, RowFile)):
            a.flush()


class ChunkWriter:
    """Writer thread: converts and stores chunks while the main thread runs the next forward.

    A bounded queue (2 chunks) keeps host memory flat if writing is ever slower than
    the teacher. After each chunk: flush the memmaps, then (one process) checkpoint progress.
    Past one process the main thread checkpoints instead, after a barrier
    (``cache_builder._checkpoint_shared``); ``wait_written`` lets it wait for this process's rows.
    """

    def __init__(self, plan: BuildPlan, arrays: dict[str, Any], on_chunk: Callable[[int], None], *,
                 checkpoint: bool = True) -> None:
        self.plan, self.arrays, self.on_chunk, self.checkpoint = plan, arrays, on_chunk, checkpoint
        self.q: queue.Queue[Chunk | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.written_end = plan.start_window
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="dflash-cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (c := self.q.get()) is not None:
            if self.error is not None:
                continue  # drain so the producer never blocks after a failure
            try:
                write_chunk(self.plan, self.arrays, c)
                flush_arrays(self.arrays)
                if self.checkpoint:
                    write_progress(self.plan.out_dir, c.end, self.plan.num_windows)
                self.on_chunk(c.count)
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                self.error = e
            with self.cond:
                self.written_end = c.end
                self.cond.notify_all()

    def wait_written(self, end: int) -> None:
        """Block until this process's rows of every chunk up to ``end`` are written and flushed."""
        with self.cond:
            self.cond.wait_for(lambda: self.written_end >= end or self.error is not None)
        if self.error is not None:
            raise self.error

    def put(self, c: Chunk) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(c)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
