"""The mmap dataset over a teacher cache directory (what the draft trainer reads).

Why mmap: the cache is far larger than host memory at gpt-oss scale, so arrays are
opened with ``np.load(mmap_mode="r")`` and only the rows of a batch are read.
Why per-host slicing: with JAX multi-controller each host feeds its own slice of
the global batch; every host computes the same seeded permutation, so no
coordination is needed. jax is imported only when the process index/count are not
given, never at module import.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dflash_gptoss.bf16 import from_bf16_bits
from dflash_gptoss.cache_format import (
    CacheFormatError,
    open_memmaps,
    read_meta,
    specs_from_meta,
    trainable_blocks,
    verify_cache_files,
)


class CacheMismatchError(ValueError):
    """The cache was built for other teacher/trainer settings than the caller's."""


def check_feature_stats(meta: dict, cache_dir: Path) -> None:
    """Refuse a cache whose recorded feature statistics are degenerate: a layer all zero, or constant.

    Real hidden states vary across positions and channels (their standard deviation is of the order of
    their RMS); a broken teacher (zeroed weights, a dead layer) gives zero or one repeated value, which
    trains and exports a draft with no warning. ``feature_stats`` is recorded by the builder (caches
    built before it have none, and are not checked).
    """
    stats = meta.get("feature_stats")
    if not stats:
        return
    for layer in stats["per_layer"]:
        mean, rms = float(layer["mean"]), float(layer["rms"])
        if rms == 0.0:
            what = "all zero (RMS 0)"
        elif rms * rms - mean * mean <= 1e-8 * rms * rms:  # std below 1e-4 of the RMS: one repeated value
            what = f"constant (every value {mean:.6g})"
        else:
            continue
        raise CacheFormatError(
            f"{cache_dir}: the features of target layer {layer['layer']} are {what} over the {stats['windows']} "
            f"windows its build measured (meta.json feature_stats): the teacher that built it is broken. Rebuild "
            "the cache from a good snapshot with --overwrite.")


def resolve_check(cache_dir: Path, verify: str) -> str:
    """``verify`` "auto" -> "full" for a cache up to ``integrity.AUTO_FULL_BYTES``, else "size"."""
    from dflash_gptoss.run_safety.integrity import AUTO_FULL_BYTES, CHECKS, IntegrityError, read_manifest

    if verify != "auto":
        if verify not in CHECKS:
            raise ValueError(f"verify must be 'auto' or one of {CHECKS}, got {verify!r}.")
        return verify
    try:
        total = int(read_manifest(cache_dir, what="teacher cache").get("total_bytes", 0))
    except IntegrityError as e:
        raise CacheFormatError(f"{e} Rebuild it with --overwrite.") from e
    return "full" if total <= AUTO_FULL_BYTES else "size"


def _process_index_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
    return int(process_index), int(process_count)


def valid_anchor_range(ctx_len: int, block_size: int) -> tuple[int, int]:
    """Inclusive anchor positions ``n`` a window of ``ctx_len`` positions supports.

    ``n >= 1`` so the block has at least one context position; ``n + block_size - 2
    <= ctx_len - 1`` so the last slot's label (argmax at ``n + B - 2``) is stored.
    """
    lo, hi = 1, ctx_len - block_size + 1
    if hi < lo:
        raise ValueError(f"ctx_len={ctx_len} is too short for block_size={block_size}.")
    return lo, hi


def window_block_target_ids(
    token_ids: np.ndarray, labels: np.ndarray, anchors: np.ndarray, block_size: int
) -> np.ndarray:
    """``windows`` layout -> the same ``target_ids`` the ``blocks`` layout stores.

    For window rows ``token_ids``/``labels`` ``[b, ctx_len]`` and anchors ``[b, A]``:
    column 0 = ``token_ids[n]`` (the anchor), column k = ``labels[n + k - 1]`` (the
    teacher's greedy token AT position ``n + k``). Returns int32 ``[b, A, block_size]``.
    The block's context is ``features[:, :n]``.
    """
    token_ids, labels, anchors = np.asarray(token_ids), np.asarray(labels), np.asarray(anchors)
    lo, hi = valid_anchor_range(token_ids.shape[-1], block_size)
    if anchors.size and (anchors.min() < lo or anchors.max() > hi):
        raise ValueError(f"anchors must lie in [{lo}, {hi}] for ctx_len={token_ids.shape[-1]}, B={block_size}.")
    rows = np.arange(token_ids.shape[0])[:, None]
    out = np.empty(anchors.shape + (block_size,), dtype=np.int32)
    out[..., 0] = token_ids[rows, anchors]
    for k in range(1, block_size):
        out[..., k] = labels[rows, anchors + k - 1]
    return out


def response_anchor_mask(response: np.ndarray, block_size: int) -> np.ndarray:
    """Which anchors of :func:`valid_anchor_range` a window row may train on: bool ``[b, hi-lo+1]``.

    ``cache_format.trainable_blocks`` over every valid anchor; prompt tokens stay usable as context.
    """
    lo, hi = valid_anchor_range(np.shape(response)[-1], block_size)
    return trainable_blocks(response, np.arange(lo, hi + 1), block_size)


class DFlashCacheDataset:
    """Random access, shuffled epochs and host-sliced numpy batches over a cache dir.

    ``bf16_as_bits=False`` restores bf16 arrays to float32 (exact); ``True`` returns the
    raw uint16 bit patterns (half the host->device bytes; convert on device).

    ``verify`` is how deeply the files are compared with the cache's manifest before any row is read
    (``integrity``): "size" (every file present at its size: instant), "full" (every byte re-hashed),
    "auto" ("full" up to ``integrity.AUTO_FULL_BYTES``, else "size" and a note naming the full check).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        seed: int = 0,
        bf16_as_bits: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
        verify: str = "size",
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.meta = read_meta(self.cache_dir)
        if not self.meta.get("complete", False):
            raise CacheFormatError(
                f"{self.cache_dir} holds an INCOMPLETE cache (its build was interrupted or is still running); "
                "finish it with scripts/tpu_dflash_build_teacher_cache.py --resume (same flags) before training."
            )
        self.verified = resolve_check(self.cache_dir, verify)
        verify_cache_files(self.cache_dir, self.verified)
        check_feature_stats(self.meta, self.cache_dir)
        self.specs = specs_from_meta(self.meta)
        self.arrays = open_memmaps(self.cache_dir, self.specs, mode="r")
        self.layout: str = self.meta["layout"]
        self.seed = int(seed)
        self.bf16_as_bits = bool(bf16_as_bits)
        self.process_index, self.process_count = _process_index_count(process_index, process_count)

    # --- what the cache holds -------------------------------------------------
    @property
    def num_items(self) -> int:
        """Blocks (``blocks`` layout) or windows (``windows`` layout)."""
        return int(self.meta["num_windows"])

    def __len__(self) -> int:
        return self.num_items

    @property
    def item_arrays(self) -> list[str]:
        """Names of the per-item arrays a batch carries (provenance offsets excluded)."""
        return [n for n in self.specs if n != "window_offsets"]

    # --- access ---------------------------------------------------------------
    def _convert(self, name: str, rows: np.ndarray) -> np.ndarray:
        if self.specs[name].bf16_bits and not self.bf16_as_bits:
            return from_bf16_bits(rows)
        return np.asarray(rows)

    def get_batch(self, indices: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """Rows ``indices`` of every item array. Sorted reads keep mmap access sequential."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_items):
            raise IndexError(f"indices must lie in [0, {self.num_items}), got {idx.min()}..{idx.max()}.")
        order = np.argsort(idx, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        out: dict[str, np.ndarray] = {}
        for name in self.item_arrays:
            rows = self.arrays[name][idx[order]]
            out[name] = self._convert(name, rows)[inverse]
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.get_batch([int(i)]).items()}

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The global order of items in ``epoch``: same on every host for the same seed."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_items)

    def iter_batches(self, global_batch_size: int, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This host's slice of each global batch of a shuffled epoch (the last partial batch is dropped)."""
        G = int(global_batch_size)
        if G <= 0 or G % self.process_count:
            raise ValueError(
                f"global_batch_size={G} must be a positive multiple of process_count={self.process_count}."
            )
        if G > self.num_items:
            raise ValueError(f"global_batch_size={G} exceeds the {self.num_items} items in {self.cache_dir}.")
        per_host = G // self.process_count
        perm = self.epoch_permutation(epoch)
        for start in range(0, self.num_items - G + 1, G):
            rows = perm[start + self.process_index * per_host : start + (self.process_index + 1) * per_host]
            yield self.get_batch(rows)

    def batches_per_epoch(self, global_batch_size: int) -> int:
        return self.num_items // int(global_batch_size)

    # --- settings check ---------------------------------------------------------
    def check_teacher(self, snapshot_dir: str | os.PathLike) -> None:
        """Refuse (``CacheMismatchError``) a snapshot other than the teacher that built this cache.

        Compared by weights fingerprint (``integrity.weights_fingerprint``), not by path: the same
        teacher may sit elsewhere on the training machine, and another teacher of the same shapes
        would pass every shape check while its features mean something else.
        """
        from dflash_gptoss.run_safety.integrity import weights_fingerprint

        recorded = self.meta["teacher"].get("weights_fingerprint")
        try:
            given = weights_fingerprint(snapshot_dir)
        except (OSError, ValueError) as e:
            raise CacheMismatchError(f"--teacher-snapshot-dir {snapshot_dir}: {e}") from e
        if recorded != given:
            raise CacheMismatchError(
                f"the cache {self.cache_dir} was built by another teacher: its meta.json records weights "
                f"fingerprint {str(recorded)[:16]}... (snapshot {self.meta['teacher']['snapshot_dir']}), but "
                f"--teacher-snapshot-dir {snapshot_dir} has {given[:16]}... Train with the teacher that built "
                "the cache, or rebuild the cache with this one.")

    def validate(
        self,
        *,
        hidden_size: int | None = None,
        num_context_features: int | None = None,
        block_size: int | None = None,
        target_layer_ids: list[int] | None = None,
        vocab_size: int | None = None,
        num_target_layers: int | None = None,
        teacher_config: Any = None,
        draft_config: Any = None,
    ) -> None:
        """Refuse (``CacheMismatchError``) a cache built for other teacher/trainer settings.

        Pass values directly, or a teacher config (transformers GptOssConfig) and/or a
        draft config (``config.make_draft_config`` output); every given value is checked.
        """
        expected: dict[str, Any] = {}
        if teacher_config is not None:
            expected.update(
                hidden_size=int(teacher_config.hidden_size),
                vocab_size=int(teacher_config.vocab_size),
                num_target_layers=int(teacher_config.num_hidden_layers),
            )
        if draft_config is not None:
            ids = [int(i) for i in draft_config.dflash_config["target_layer_ids"]]
            expected.update(
                hidden_size=int(draft_config.hidden_size),
                vocab_size=int(draft_config.vocab_size),
                block_size=int(draft_config.block_size),
                target_layer_ids=ids,
                num_context_features=len(ids),
                num_target_layers=int(draft_config.num_target_layers),
            )
        given = dict(
            hidden_size=hidden_size,
            num_context_features=num_context_features,
            block_size=block_size,
            target_layer_ids=None if target_layer_ids is None else [int(i) for i in target_layer_ids],
            vocab_size=vocab_size,
            num_target_layers=num_target_layers,
        )
        expected.update({k: v for k, v in given.items() if v is not None})
        teacher = self.meta["teacher"]
        have = {
            "hidden_size": teacher["hidden_size"],
            "vocab_size": teacher["vocab_size"],
            "num_target_layers": teacher["num_hidden_layers"],
            "num_context_features": self.meta["num_context_features"],
            "block_size": self.meta["block_size"],
            "target_layer_ids": list(self.meta["target_layer_ids"]),
        }
        problems = [
            f"{k}: cache has {have[k]!r}, expected {v!r}"
            for k, v in expected.items()
            if have[k] != v and not (k == "block_size" and self.layout == "windows")
        ]
        wanted_block = expected.get("block_size")
        if self.layout == "windows" and wanted_block is not None and wanted_block > self.meta["ctx_len"]:
            # A windows cache serves any block size that fits in its windows.
            problems.append(f"block_size: {wanted_block} does not fit in the cache's ctx_len={self.meta['ctx_len']}")
        if problems:
            raise CacheMismatchError(
                f"the cache {self.cache_dir} (teacher {teacher['snapshot_dir']}) does not match the requested "
                "settings: " + "; ".join(problems) + ". Rebuild the cache or change the settings."
            )
