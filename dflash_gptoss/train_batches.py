"""What one training step reads: cache rows -> anchors -> blocks, and the teacher's frozen tables.

Invariant: the batches are a pure function of (cache, seed, step): anchors are drawn from
``rng([seed, step])`` for the whole global batch and sliced per process, so a resumed run, any number
of hosts and the held-out evaluation (with its own fixed seed) all see exactly the blocks they would
see uninterrupted. numpy only (plus safetensors for the tables): no jax here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dflash_gptoss.easydel_dflash_cache import DFlashCacheDataset, valid_anchor_range


class FrozenTablesError(ValueError):
    """The teacher snapshot lacks the embedding / lm_head tables (the message names the snapshot)."""


def anchor_positions_for_step(ctx_len: int, block_size: int, anchors_per_window: int, rows: int,
                              seed: int, step: int, *, allowed: np.ndarray | None = None, row_offset: int = 0,
                              global_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Anchors ``[rows, A]`` and their weights for a ``windows`` batch, drawn afresh each step.

    Valid anchors are ``n`` in ``[1, ctx_len - B + 1]`` (``valid_anchor_range``): ``n >= 1`` so a
    block has at least one context position, and the last slot's label ``labels[n + B - 2]``
    must lie inside the window. ``A = min(anchors_per_window, number of valid anchors)``, drawn
    without replacement. ``allowed`` (bool ``[rows, hi-lo+1]``, from
    ``easydel_dflash_cache.response_anchor_mask``) keeps anchors out of prompts: allowed ones
    are drawn first, and a row with fewer than ``A`` fills up with weight-0 anchors.

    Keys are drawn for the whole global batch of ``global_rows`` (default ``rows``) seeded by
    ``(seed, step)`` and rows ``row_offset ..`` taken, so a resumed run and any number of
    processes see the same anchors.
    """
    lo, hi = valid_anchor_range(ctx_len, block_size)
    count = min(int(anchors_per_window), hi - lo + 1)
    rng = np.random.default_rng([int(seed), int(step), 0xA7])
    g = rows if global_rows is None else int(global_rows)
    keys = rng.random((g, hi - lo + 1))[row_offset: row_offset + rows]
    if allowed is not None:
        keys = keys + 2.0 * ~allowed  # keys lie in [0, 1): every allowed anchor sorts before any other
    picks = np.sort(np.argsort(keys, axis=1)[:, :count], axis=1)
    weights = np.ones(picks.shape, np.float32) if allowed is None else np.take_along_axis(allowed, picks, 1)
    return (picks + lo).astype(np.int32), weights.astype(np.float32)


def anchors_per_row(layout: str, ctx_len: int, block_size: int, anchors_per_window: int) -> int:
    """Blocks per cache row in a step: 1 in ``blocks``, else ``anchors_per_window`` capped by the valid anchors."""
    if layout == "blocks":
        return 1
    lo, hi = valid_anchor_range(ctx_len, block_size)
    return min(int(anchors_per_window), hi - lo + 1)


def step_batch_shapes(rows: int, *, ctx_len: int, features_width: int, anchors: int,
                      block_size: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """``{name: (shape, dtype)}`` of the global batch one step reads (what :func:`host_batch` builds).

    ``rows`` = total_batch_size x gradient accumulation; ``features_width`` = K x H; ``anchors``
    from :func:`anchors_per_row`. Features travel as bf16 bit patterns (uint16). The TPU planner
    compiles the step on these shapes.
    """
    return {
        "context_features": ((rows, ctx_len, features_width), np.uint16),
        "target_ids": ((rows, anchors, block_size), np.int32),
        "anchor_positions": ((rows, anchors), np.int32),
        "anchor_weights": ((rows, anchors), np.float32),
    }


def host_batch(ds: DFlashCacheDataset, rows: np.ndarray, *, block_size: int, anchors_per_window: int,
               seed: int, step: int, row_offset: int = 0, global_rows: int | None = None) -> dict[str, np.ndarray]:
    """One host's numpy batch in the layout-independent form the step function reads.

    ``rows`` are rows ``row_offset ..`` of a global batch of ``global_rows`` (default: ``len(rows)``,
    one host): anchors are drawn for the whole global batch and sliced, so a batch is the same
    however many processes feed it.

    ``context_features`` [b, C, K*H] (bf16 bits), ``target_ids`` [b, nb, B] (column 0 the anchor
    token, column k the teacher's token AT anchor+k), ``anchor_positions`` [b, nb]. ``blocks``:
    nb = 1, anchor at position ``ctx_len`` (the window's features are positions 0..ctx_len-1).
    """
    from dflash_gptoss.easydel_dflash_cache import response_anchor_mask, window_block_target_ids

    raw = ds.get_batch(rows)
    ctx_len = int(ds.meta["ctx_len"])
    if ds.layout == "blocks":
        return {
            "context_features": raw["context_features"],
            "target_ids": raw["target_ids"][:, None, :].astype(np.int32),
            "anchor_positions": np.full((len(rows), 1), ctx_len, dtype=np.int32),
            "anchor_weights": np.ones((len(rows), 1), dtype=np.float32),  # the builder drew response blocks only
        }
    anchors, weights = anchor_positions_for_step(
        ctx_len, block_size, anchors_per_window, len(rows), seed, step, row_offset=row_offset,
        global_rows=global_rows, allowed=response_anchor_mask(raw["response"], block_size))
    return {
        "context_features": raw["features"],  # every position; block j sees only positions < its anchor
        "target_ids": window_block_target_ids(raw["token_ids"], raw["labels"], anchors, block_size),
        "anchor_positions": anchors,
        "anchor_weights": weights,
    }


def _safetensors_files(snapshot: Path) -> list[Path]:
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [snapshot / n for n in names]
    files = sorted(snapshot.glob("*.safetensors"))
    if not files:
        raise FrozenTablesError(f"no *.safetensors in --teacher-snapshot-dir {snapshot}.")
    return files


def load_frozen_tables(snapshot_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(``embed_tokens`` [V, H], ``lm_head.weight`` [V, H]) as float32 numpy, from the teacher snapshot.

    Read through torch's safetensors loader because numpy has no bf16 (the real gpt-oss
    stores both in bf16; the conversion to float32 is exact).
    """
    from safetensors import safe_open

    wanted = {"model.embed_tokens.weight": None, "lm_head.weight": None}
    for path in _safetensors_files(Path(snapshot_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in wanted:
                if wanted[name] is None and name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    wanted[name] = f.get_tensor(name).float().numpy()
    if wanted["lm_head.weight"] is None and wanted["model.embed_tokens.weight"] is not None:
        wanted["lm_head.weight"] = wanted["model.embed_tokens.weight"]  # tied embeddings
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise FrozenTablesError(f"teacher snapshot {snapshot_dir} lacks {missing}.")
    return wanted["model.embed_tokens.weight"], wanted["lm_head.weight"]
