"""Held-out evaluation while training: the accepted length the benchmark would count, on text never trained on.

Invariant: every evaluation of a run scores the SAME blocks of a cache the draft never trains on, with
the training step's own loss function (``dflash_batch_loss``) on the training mesh, so the curve moves
only because the draft does. A block's accepted length is ``1 + the number of leading slots whose argmax
equals the teacher's greedy token`` (at most B): what one verify of the speculative loop accepts.

Which blocks, and why it matters: the benchmark counts one accepted length per VERIFY STEP of a greedy
walk through the text (anchor n accepts a, the next anchor is n + a). Easy stretches (a repeated line)
are crossed in few long steps, hard ones in many short steps, so a per-step mean is far below the mean
over uniformly drawn positions (measured on the demo's draft: 4.86 per walk step vs 5.98 per position,
against 4.52 in the benchmark). So the evaluator scores EVERY trainable anchor of its windows (teacher
forcing: on the teacher's own text the context after an accepted block is exactly what the loop has)
and then walks each run of trainable anchors from its start as the loop would: the headline
``eval_accept_len_*`` figures are per walk step, like the benchmark's; the per-position mean is kept
beside them (``eval_accept_len_position_mean``). A ``blocks``-layout cache has one block per window
(no positions to walk): every block is one step.

Why it exists: a draft can reach high accuracy on its training batches and still be accepted ~1 token
per block at inference (overfitting, a slot shift, a layer offset); only text outside training shows it.

At a sampling temperature T > 0 (``--eval-temperature``) a verify accepts the draft's argmax proposal
``x_j`` with probability ``p_j(x_j)`` (``q`` is one-hot), so a block's expected accepted length is
``1 + sum_k prod_{j<=k} p_j(x_j)``. The argmax labels alone do not give ``p``: the trainer computes
the teacher's ``k`` most likely tokens and their probabilities at T for every position of the eval
cache once, at start (``TeacherTopK``, on device with the builder's teacher), and looks each proposal up
there. A proposal outside the top k has probability between 0 and the smaller of the k-th probability
and the mass the top k miss, so the figure is reported as that interval (``..._lower`` / ``..._upper``;
equal when every proposal was found). ``p_j`` is the teacher's law at the block's slot j given the
cached text (teacher forcing), which is the law the verify applies whenever the proposals before slot j
equal that text; the figure is a mean over every scored block (per position), not a walk.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


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


def window_digests(ds: Any) -> dict[bytes, int]:
    """sha256 of each window's token ids -> its row (``windows`` layout: the teacher's whole input per row)."""
    import hashlib

    tokens = ds.arrays["token_ids"]
    return {hashlib.sha256(np.ascontiguousarray(tokens[r]).tobytes()).digest(): r for r in range(ds.num_items)}


def check_held_out(train_ds: Any, eval_ds: Any, eval_dir: Any) -> None:
    """The eval cache must be held out: not the training cache, and no window's token sequence in both.

    ``windows`` caches are compared window by window (a digest of each row's token ids); ``blocks``
    caches store no context tokens, so two of them held out must come from different data (their
    ``tokens_sha256`` differ).
    """
    same_dir = Path(train_ds.cache_dir).resolve() == Path(eval_dir).resolve()
    same_data = train_ds.meta["data"].get("tokens_sha256") == eval_ds.meta["data"].get("tokens_sha256")
    if same_dir or (same_data and train_ds.meta.get("seed") == eval_ds.meta.get("seed")):
        raise EvalCacheError(f"--eval-cache-dir {eval_dir} is the training cache {train_ds.cache_dir} (same data, "
                             "same seed): its figures would not be held out. Build the eval cache from data the "
                             "training cache never saw (scripts/generate_teacher_data.py --split heldout).")
    if train_ds.layout == "blocks":
        if same_data:
            digest = eval_ds.meta["data"]["tokens_sha256"][:16]
            raise EvalCacheError(f"--eval-cache-dir {eval_dir} was built from the same data as the training cache "
                                 f"{train_ds.cache_dir} (tokens_sha256 {digest}...); in the blocks layout their "
                                 "windows cannot be told apart. Build it from held-out data.")
        return
    train = window_digests(train_ds)
    shared = [(train[d], r) for d, r in window_digests(eval_ds).items() if d in train]
    if shared:
        t, e = shared[0]
        raise EvalCacheError(f"--eval-cache-dir {eval_dir} shares {len(shared)} window(s) with the training cache "
                             f"{train_ds.cache_dir} (e.g. its row {e} is training row {t}, token for token): its "
                             "figures would not be held out. Build it from data the training cache never saw.")


@dataclass
class EvalBlock:
    """Where one scored block comes from, for the torch side of the export check."""

    row: int  # row of the eval cache
    anchor: int  # anchor position in that row's window
    target_ids: np.ndarray  # [B]: the anchor token, then the teacher's greedy token at each slot


@dataclass
class EvalSet:
    """The fixed held-out blocks in global batches of ``rows_per_batch`` items (zero-weight padding), and the
    greedy walks over them: ``(cache row, first anchor, last anchor)`` of every run of trainable anchors."""

    batches: list[dict[str, np.ndarray]]
    blocks: list[EvalBlock]  # every real block, in the order the batches hold them
    walks: list[tuple[int, int, int]]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


def _runs(mask: np.ndarray, offset: int) -> list[tuple[int, int]]:
    """``(first, last)`` positions (``offset`` + index) of every run of True in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return [(int(a) + offset, int(b) - 1 + offset) for a, b in zip(np.flatnonzero(edges == 1),
                                                                     np.flatnonzero(edges == -1), strict=True)]


def _window_items(ds: Any, row: int, block_size: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Every trainable anchor of one window and the runs they form (``windows`` layout)."""
    from dflash_gptoss.easydel_dflash_cache import response_anchor_mask, valid_anchor_range

    lo, _ = valid_anchor_range(int(ds.meta["ctx_len"]), block_size)
    allowed = response_anchor_mask(np.asarray(ds.arrays["response"][row])[None], block_size)[0]
    return np.flatnonzero(allowed) + lo, _runs(allowed, lo)


def build_eval_set(ds: Any, *, block_size: int, anchors_per_item: int, rows_per_batch: int,
                   max_rows: int | None = None) -> EvalSet:
    """Every trainable anchor of the cache's windows (or its first ``max_rows``), ``anchors_per_item`` anchors
    to a batch item (a window's features with some of its anchors), ``rows_per_batch`` items to a batch."""
    from dflash_gptoss.easydel_dflash_cache import window_block_target_ids
    from dflash_gptoss.train_batches import host_batch

    n, g, a = min(ds.num_items, max_rows or ds.num_items), int(rows_per_batch), int(anchors_per_item)
    if ds.layout == "blocks":  # one block per window, at ctx_len: each is one walk step
        rows = np.arange(n)
        items = [(int(r), np.array([int(ds.meta["ctx_len"])])) for r in rows]
        walks = [(int(r), int(ds.meta["ctx_len"]), int(ds.meta["ctx_len"])) for r in rows]
    else:
        items, walks = [], []
        for r in range(n):
            anchors, runs = _window_items(ds, r, block_size)
            items += [(r, anchors[i: i + a]) for i in range(0, anchors.size, a)]
            walks += [(r, first, last) for first, last in runs]
    if not items:
        raise EvalCacheError(f"the eval cache {ds.cache_dir} has no block in response text to score.")
    width = 1 if ds.layout == "blocks" else a
    batches, blocks = [], []
    for start in range(0, len(items), g):
        chunk = items[start: start + g]
        rows = np.array([r for r, _ in chunk] + [chunk[0][0]] * (g - len(chunk)))
        if ds.layout == "blocks":
            batch = host_batch(ds, rows, block_size=block_size, anchors_per_window=1, seed=0, step=0)
        else:
            raw = ds.get_batch(rows)
            anchors = np.stack([np.resize(anc, width) for _, anc in chunk] + [chunk[0][1][:1].repeat(width)]
                               * (g - len(chunk))).astype(np.int32)
            batch = {"context_features": raw["features"], "anchor_positions": anchors,
                     "target_ids": window_block_target_ids(raw["token_ids"], raw["labels"], anchors, block_size),
                     "anchor_weights": np.zeros(anchors.shape, np.float32)}
            for i, (_, anc) in enumerate(chunk):
                batch["anchor_weights"][i, : anc.size] = 1.0
        batch["anchor_weights"][len(chunk):] = 0.0
        for i, (r, anc) in enumerate(chunk):
            for j in range(min(anc.size, width)):
                blocks.append(EvalBlock(int(r), int(batch["anchor_positions"][i, j]), batch["target_ids"][i, j].copy()))
        batches.append(batch)
    return EvalSet(batches, blocks, walks)


@dataclass
class TeacherTopK:
    """The teacher's ``k`` most likely next tokens and their probabilities at ``temperature``, per eval position.

    ``ids`` / ``probs`` ``[rows, ctx_len, k]``: at position t, the law of the token at position t+1 (the
    ``labels`` convention of the cache).
    """

    temperature: float
    ids: np.ndarray
    probs: np.ndarray


def teacher_top_k(teacher: Any, token_ids: np.ndarray, temperature: float, k: int, rows_per_call: int) -> TeacherTopK:
    """:class:`TeacherTopK` of every row of ``token_ids`` ``[rows, C]``, ``rows_per_call`` rows per forward
    (padded with the last row to a whole call; the padding's results are dropped)."""
    token_ids = np.asarray(token_ids, dtype=np.int32)
    n, ids, probs = len(token_ids), [], []
    for start in range(0, n, rows_per_call):
        chunk = token_ids[start: start + rows_per_call]
        pad = rows_per_call - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        i, p = teacher.top_probs(chunk, temperature, k)
        ids.append(i[: rows_per_call - pad])
        probs.append(p[: rows_per_call - pad])
    return TeacherTopK(float(temperature), np.concatenate(ids), np.concatenate(probs).astype(np.float64))


def proposal_probabilities(eval_set: EvalSet, pred: np.ndarray, top: TeacherTopK) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds ``[blocks, B-1]`` on ``p_j(x_j)`` for each block's argmax proposals ``pred``.

    Slot j of a block anchored at n proposes the token at n+j, whose law is the teacher's at position
    n+j-1. Exact (both bounds equal) when the proposal is in the top k; else in [0, min(p_k, 1 - top-k mass)].
    """
    pred = np.asarray(pred)
    rows = np.array([b.row for b in eval_set.blocks])
    anchors = np.array([b.anchor for b in eval_set.blocks])
    positions = anchors[:, None] + np.arange(pred.shape[1])[None]  # [blocks, B-1]: n + j - 1 for j = 1..B-1
    ids, probs = top.ids[rows[:, None], positions], top.probs[rows[:, None], positions]  # [blocks, B-1, k]
    hit = ids == pred[..., None]
    exact = np.where(hit, probs, 0.0).sum(axis=-1)
    found = hit.any(axis=-1)
    ceiling = np.minimum(probs[..., -1], np.clip(1.0 - probs.sum(axis=-1), 0.0, None))
    return exact, np.where(found, exact, ceiling)


def expected_accept_lengths(p_x: np.ndarray) -> np.ndarray:
    """``1 + sum_k prod_{j<=k} p_j(x_j)`` per block (``p_x`` ``[..., B-1]``): the expected accepted length at T."""
    return 1.0 + np.cumprod(np.asarray(p_x, dtype=np.float64), axis=-1).sum(axis=-1)


def sampled_summary(eval_set: EvalSet, pred: np.ndarray, top: TeacherTopK) -> dict[str, Any]:
    """The ``eval_history`` fields at ``top.temperature``: expected accepted length (bounds), per-slot p(x)."""
    lower, upper = proposal_probabilities(eval_set, pred, top)
    return {
        "eval_temperature": top.temperature,
        "eval_expected_accept_len_lower": float(expected_accept_lengths(lower).mean()),
        "eval_expected_accept_len_upper": float(expected_accept_lengths(upper).mean()),
        "eval_slot_accept_prob": [float(x) for x in lower.mean(axis=0)],
        "eval_proposals_outside_top_k": float(1.0 - np.mean(lower == upper)),
        "eval_top_k": int(top.ids.shape[-1]),
    }


def accept_lengths(correct: np.ndarray) -> np.ndarray:
    """``1 + leading run of correct slots`` per block (``correct`` [..., B-1] of 0/1), the benchmark's count."""
    return 1 + np.cumprod(np.asarray(correct) > 0, axis=-1).sum(axis=-1)


def _p90(values: np.ndarray) -> float:
    return float(np.percentile(values, 90)) if values.size else float("nan")


def walk_steps(eval_set: EvalSet, accept: np.ndarray) -> np.ndarray:
    """The accepted length of every verify step of the greedy walks (``accept`` per block, blocks order).

    From a run's first anchor n: the loop accepts ``a = accept(n)`` tokens and its next anchor is n + a,
    until the run's last anchor is passed (a block needs all its labels in the run)."""
    at = {(b.row, b.anchor): int(x) for b, x in zip(eval_set.blocks, accept, strict=True)}
    steps = []
    for row, first, last in eval_set.walks:
        n = first
        while n <= last:
            steps.append(at[(row, n)])
            n += steps[-1]
    return np.asarray(steps, dtype=np.int64)


def summarize(step: int, loss: float, correct: np.ndarray, eval_set: EvalSet, seconds: float,
              pred: np.ndarray | None = None, top: TeacherTopK | None = None) -> dict[str, Any]:
    """One ``eval_history`` entry from every block's per-slot correctness ``[blocks, B-1]`` (blocks order),
    and with ``top``, the expected accepted length at its temperature from the proposals ``pred``."""
    per_block = accept_lengths(correct)
    walked = walk_steps(eval_set, per_block)
    hist = {str(k): int(v) for k, v in zip(*np.unique(walked, return_counts=True), strict=True)}
    return {
        "step": int(step),
        "eval_loss": float(loss),
        "eval_accept_len_mean": float(walked.mean()),
        "eval_accept_len_median": float(statistics.median(walked.tolist())),
        "eval_accept_len_p90": _p90(walked),
        "eval_accept_len_hist": hist,
        "eval_walk_steps": int(walked.size),
        "eval_accept_len_position_mean": float(per_block.mean()),
        "eval_slot_accuracy": [float(x) for x in np.asarray(correct, np.float64).mean(axis=0)],
        "eval_blocks": int(per_block.size),
        "eval_seconds": float(seconds),
        **(sampled_summary(eval_set, pred, top) if top is not None else {}),
    }


class HeldoutEvaluator:
    """Scores a draft's parameters on an :class:`EvalSet` with one jitted forward per batch (no gradient).

    ``loss_kwargs`` are :func:`dflash_batch_loss`'s keyword arguments (mesh, mask id, slot weights, vocab
    chunk); ``graph_shardings`` the shardings of the state's ``graphstate``.
    """

    def __init__(self, state: Any, eval_set: EvalSet, *, embed: Any, lm_head: Any, batch_sharding: Any,
                 graph_shardings: Any, table_sharding: Any, loss_kwargs: dict[str, Any],
                 top: TeacherTopK | None = None) -> None:
        import jax

        from dflash_gptoss.train_step import dflash_batch_loss

        self.eval_set, self.embed, self.lm_head, self.batch_sharding = eval_set, embed, lm_head, batch_sharding
        self.top = top
        graphdef, graphother = state.graphdef, state.graphother

        def score(graphstate: Any, batch: dict[str, Any], embed: Any, lm_head: Any) -> tuple[Any, Any]:
            from flax import nnx

            module = nnx.merge(graphdef, graphstate, graphother)
            loss, m = dflash_batch_loss(module, batch, embed, lm_head, **loss_kwargs)
            return loss, m["correct"], m["pred"]

        self._score = jax.jit(score, in_shardings=(graph_shardings, batch_sharding, table_sharding, table_sharding))

    def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import jax

        from dflash_gptoss.distributed import process_row_range

        g = next(iter(batch.values())).shape[0]
        lo, hi = process_row_range(self.batch_sharding, (g,))
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v[lo:hi], v.shape)
                for k, v in batch.items()}

    def score(self, graphstate: Any) -> tuple[float, np.ndarray, np.ndarray]:
        """(loss over the real blocks, per-slot correctness and argmax proposals ``[blocks, B-1]`` in
        :attr:`EvalSet.blocks` order)."""
        from dflash_gptoss.distributed import gather_to_host

        losses, weights, rows, preds = [], [], [], []
        for batch in self.eval_set.batches:
            loss, correct, pred = self._score(graphstate, self._device_batch(batch), self.embed, self.lm_head)
            correct, pred = gather_to_host((correct, pred))
            w = batch["anchor_weights"]
            losses.append(float(loss))
            weights.append(float(w.sum()))
            rows.append(np.asarray(correct)[w > 0])
            preds.append(np.asarray(pred)[w > 0])
        loss = float(np.dot(losses, weights) / max(sum(weights), 1.0))
        return loss, np.concatenate(rows, axis=0), np.concatenate(preds, axis=0)

    def correct(self, graphstate: Any) -> tuple[float, np.ndarray]:
        """(loss over the real blocks, per-slot correctness ``[blocks, B-1]`` in :attr:`EvalSet.blocks` order)."""
        loss, correct, _ = self.score(graphstate)
        return loss, correct

    def evaluate(self, graphstate: Any, step: int) -> tuple[dict[str, Any], np.ndarray]:
        """An ``eval_history`` entry and the per-block correctness behind it."""
        t0 = time.perf_counter()
        loss, correct, pred = self.score(graphstate)
        return summarize(step, loss, correct, self.eval_set, time.perf_counter() - t0, pred, self.top), correct
