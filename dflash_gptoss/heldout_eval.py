"""Held-out evaluation while training: the accepted length the benchmark would count, on text never trained on.

Invariant: every evaluation of a run scores the SAME blocks (anchors drawn once, seeded) of a cache the
draft never trains on, with the training step's own loss function (``dflash_batch_loss``) on the
training mesh, so the curve moves only because the draft does. A block's accepted length is
``1 + the number of leading slots whose argmax equals the teacher's greedy token`` (at most B): what one
verify of the speculative loop accepts when the draft sees these features (teacher forcing: the
context is the teacher's own text, as after a fully accepted block).

Why it exists: a draft can reach high accuracy on its training batches and still be accepted ~1 token
per block at inference (overfitting, a slot shift, a layer offset); only text outside training shows it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

EVAL_SEED = 0xE7A1
"""Anchor seed of the held-out blocks (fixed: the set is the same for every run over one eval cache)."""


class EvalCacheError(ValueError):
    """An eval cache that cannot score this run (another teacher or geometry); the message says which."""


def check_eval_cache(train_meta: dict[str, Any], eval_meta: dict[str, Any], eval_dir: Any) -> None:
    """The eval cache must come from the same teacher with the same geometry as the training cache."""
    def view(meta: dict[str, Any]) -> dict[str, Any]:
        t = meta["teacher"]
        return {"teacher weights fingerprint": t.get("weights_fingerprint"), "hidden_size": t["hidden_size"],
                "vocab_size": t["vocab_size"], "layout": meta["layout"], "ctx_len": meta["ctx_len"],
                "block_size": meta["block_size"], "target_layer_ids": list(meta["target_layer_ids"])}

    want, have = view(train_meta), view(eval_meta)
    diff = [f"{k}: training cache {want[k]!r}, eval cache {have[k]!r}" for k in want if want[k] != have[k]]
    if diff:
        raise EvalCacheError(f"--eval-cache-dir {eval_dir} does not match the training cache (" + "; ".join(diff)
                             + "); build it from held-out data with the same teacher and the same --layout, "
                             "--ctx-len, --block-size and --num-context-features.")


@dataclass
class EvalBlock:
    """Where one scored block comes from, for the torch side of the export check."""

    row: int  # row of the eval cache
    anchor: int  # anchor position in that row's window
    target_ids: np.ndarray  # [B]: the anchor token, then the teacher's greedy token at each slot


@dataclass
class EvalSet:
    """The fixed held-out blocks: global host batches of ``rows_per_batch`` rows (zero-weight padding)."""

    batches: list[dict[str, np.ndarray]]
    blocks: list[EvalBlock]  # every real block, in the order the batches hold them

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def build_eval_set(ds: Any, *, block_size: int, anchors_per_window: int, rows_per_batch: int,
                   max_rows: int | None = None) -> EvalSet:
    """Every window of the cache (or its first ``max_rows``), ``anchors_per_window`` seeded anchors each
    (response text only), in global batches of ``rows_per_batch`` rows."""
    from dflash_gptoss.training_data import host_batch

    n, g = min(ds.num_items, max_rows or ds.num_items), int(rows_per_batch)
    batches, blocks = [], []
    for i, start in enumerate(range(0, n, g)):
        rows = np.arange(start, min(start + g, n))
        pad = g - rows.size
        padded = np.concatenate([rows, np.repeat(rows[:1], pad)]) if pad else rows
        batch = host_batch(ds, padded, block_size=block_size, anchors_per_window=anchors_per_window,
                           seed=EVAL_SEED, step=i)
        if pad:
            batch["anchor_weights"][rows.size:] = 0.0
        for r in range(rows.size):
            for j in np.flatnonzero(batch["anchor_weights"][r] > 0):
                blocks.append(EvalBlock(int(rows[r]), int(batch["anchor_positions"][r, j]),
                                        batch["target_ids"][r, j].copy()))
        batches.append(batch)
    if not blocks:
        raise EvalCacheError(f"the eval cache {ds.cache_dir} has no block in response text to score.")
    return EvalSet(batches, blocks)


def accept_lengths(correct: np.ndarray) -> np.ndarray:
    """``1 + leading run of correct slots`` per block (``correct`` [..., B-1] of 0/1), the benchmark's count."""
    return 1 + np.cumprod(np.asarray(correct) > 0, axis=-1).sum(axis=-1)


def _p90(values: np.ndarray) -> float:
    return float(np.percentile(values, 90)) if values.size else float("nan")


def summarize(step: int, loss: float, correct: np.ndarray, seconds: float) -> dict[str, Any]:
    """One ``eval_history`` entry from the real blocks' per-slot correctness ``[blocks, B-1]``."""
    acc = accept_lengths(correct)
    hist = {str(k): int(v) for k, v in zip(*np.unique(acc, return_counts=True), strict=True)}
    return {
        "step": int(step),
        "eval_loss": float(loss),
        "eval_accept_len_mean": float(acc.mean()),
        "eval_accept_len_median": float(statistics.median(acc.tolist())),
        "eval_accept_len_p90": _p90(acc),
        "eval_slot_accuracy": [float(x) for x in np.asarray(correct, np.float64).mean(axis=0)],
        "eval_accept_len_hist": hist,
        "eval_blocks": int(acc.size),
        "eval_seconds": float(seconds),
    }


class HeldoutEvaluator:
    """Scores a draft's parameters on an :class:`EvalSet` with one jitted forward per batch (no gradient).

    ``loss_kwargs`` are :func:`dflash_batch_loss`'s keyword arguments (mesh, mask id, slot weights, vocab
    chunk); ``graph_shardings`` the shardings of the state's ``graphstate``.
    """

    def __init__(self, state: Any, eval_set: EvalSet, *, embed: Any, lm_head: Any, batch_sharding: Any,
                 graph_shardings: Any, table_sharding: Any, loss_kwargs: dict[str, Any]) -> None:
        import jax

        from dflash_gptoss.easydel_dflash_trainer import dflash_batch_loss

        self.eval_set, self.embed, self.lm_head, self.batch_sharding = eval_set, embed, lm_head, batch_sharding
        graphdef, graphother = state.graphdef, state.graphother

        def score(graphstate: Any, batch: dict[str, Any], embed: Any, lm_head: Any) -> tuple[Any, Any]:
            from flax import nnx

            module = nnx.merge(graphdef, graphstate, graphother)
            loss, m = dflash_batch_loss(module, batch, embed, lm_head, **loss_kwargs)
            return loss, m["correct"]

        self._score = jax.jit(score, in_shardings=(graph_shardings, batch_sharding, table_sharding, table_sharding))

    def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import jax

        from dflash_gptoss.distributed import process_row_range

        g = next(iter(batch.values())).shape[0]
        lo, hi = process_row_range(self.batch_sharding, (g,))
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v[lo:hi], v.shape)
                for k, v in batch.items()}

    def correct(self, graphstate: Any) -> tuple[float, np.ndarray]:
        """(loss over the real blocks, per-slot correctness ``[blocks, B-1]`` in :attr:`EvalSet.blocks` order)."""
        from jax.experimental import multihost_utils

        losses, weights, rows = [], [], []
        for batch in self.eval_set.batches:
            loss, correct = self._score(graphstate, self._device_batch(batch), self.embed, self.lm_head)
            if not correct.is_fully_addressable:
                correct = multihost_utils.process_allgather(correct, tiled=True)
            correct = np.asarray(correct)
            w = batch["anchor_weights"]
            losses.append(float(loss))
            weights.append(float(w.sum()))
            rows.append(correct[w > 0])
        loss = float(np.dot(losses, weights) / max(sum(weights), 1.0))
        return loss, np.concatenate(rows, axis=0)

    def evaluate(self, graphstate: Any, step: int) -> tuple[dict[str, Any], np.ndarray]:
        """An ``eval_history`` entry and the per-block correctness behind it."""
        t0 = time.perf_counter()
        loss, correct = self.correct(graphstate)
        return summarize(step, loss, correct, time.perf_counter() - t0), correct
