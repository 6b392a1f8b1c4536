"""The DFlash draft's loss and its jitted optimizer step: what one training step computes.

Invariant: one definition of the step (:func:`make_train_step`) serves the trainer
(``DFlashTrainer.configure_functions``) and the TPU planner (``tpu_plan.plan_train_step``), so a
plan compiles exactly the program a run executes, with the run's shardings: batch rows over
``dp`` (:data:`BATCH_SPEC`), the frozen ``embed_tokens`` / ``lm_head`` vocab rows over ``tp``
(:data:`FROZEN_TABLE_SPEC`), the draft state as easydel shards it. The loss is exact
cross-entropy over the whole vocabulary, computed in vocab chunks on each tp shard
(``train_sharded_ce``); no logits tensor of the full vocabulary is ever made.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dflash_gptoss.mesh import DP, TP


def default_loss_decay_gamma(block_size: int) -> float:
    """The published recipes' decay: gamma 4 for block 8, 7 for block 16 (and above)."""
    return 4.0 if block_size <= 8 else 7.0


def resolve_loss_decay_gamma(gamma: float | None, block_size: int) -> float:
    """A run's gamma: the one given (``--loss-decay-gamma``), else :func:`default_loss_decay_gamma`.

    One rule for the trainer and the TPU planner, so a plan compiles the run's loss weights.
    """
    return default_loss_decay_gamma(block_size) if gamma is None else gamma


def slot_weights(block_size: int, gamma: float) -> np.ndarray:
    """Loss weight of slots 1..B-1: ``exp(-(k-1)/gamma)``; ``gamma == 0`` means uniform.

    Earlier slots weigh more because acceptance stops at the first miss (docs/design.md, "How DFlash works").
    """
    k = np.arange(1, block_size, dtype=np.float64)
    if gamma < 0:
        raise ValueError(f"loss_decay_gamma={gamma} must be >= 0 (0 = uniform weights).")
    w = np.ones_like(k) if gamma == 0 else np.exp(-(k - 1) / gamma)
    return w.astype(np.float32)


def expected_accept_length(slot_acc: jax.Array) -> jax.Array:
    """``1 + sum_k prod_{j<=k} acc_j`` over slots k = 1..B-1.

    ``acc_j`` is the top-1 accuracy of slot j; treating slots as independent, the
    probability that the first k proposals are all accepted is the product, and the
    target always adds one token (the correction or the bonus), hence the ``1 +``.
    ``mean_accept_len`` (logged next to it) is the direct per-block figure without the
    independence assumption: 1 + the length of each block's leading run of correct slots.
    """
    return 1.0 + jnp.sum(jnp.cumprod(slot_acc))


def dflash_loss_and_metrics(
    hidden: jax.Array,
    target_ids: jax.Array,
    lm_head: jax.Array,
    weights: jax.Array,
    anchor_weights: jax.Array,
    *,
    mesh: Any,
    vocab_chunk_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted exact CE over slots 1..B-1 of ``hidden`` [b, nb, B, H] against ``target_ids[..., 1:]``.

    Slot k's hidden state proposes the token AT position anchor+k (same-position prediction:
    its label is column k of ``target_ids``, no shift). ``anchor_weights`` [b, nb] (1 = a real
    block, 0 = a filler anchor of a window with too few response anchors) weigh the blocks in
    every mean. Returns ``(loss, metrics)`` with per-slot accuracy ``[B-1]``, mean accuracy,
    both acceptance-length figures and the per-block, per-slot correctness ``correct``.
    """
    from dflash_gptoss.train_sharded_ce import chunked_sharded_cross_entropy

    b, nb, bs, h = hidden.shape
    labels = target_ids[..., 1:].astype(jnp.int32)
    nll, pred = chunked_sharded_cross_entropy(
        hidden[:, :, 1:, :].reshape(-1, h), lm_head, labels.reshape(-1), mesh=mesh,
        vocab_chunk_size=vocab_chunk_size, dp_axis=DP, tp_axis=TP,
    )
    nll = nll.reshape(b, nb, bs - 1)
    correct = (pred.reshape(b, nb, bs - 1) == labels).astype(jnp.float32)
    aw = anchor_weights.astype(jnp.float32)
    blocks = jnp.maximum(jnp.sum(aw), 1.0)
    slot_nll = jnp.sum(nll * aw[..., None], axis=(0, 1)) / blocks
    slot_acc = jnp.sum(correct * aw[..., None], axis=(0, 1)) / blocks
    loss = jnp.sum(weights * slot_nll) / jnp.sum(weights)
    leading_run = jnp.sum(jnp.cumprod(correct, axis=-1), axis=-1)  # [b, nb]
    metrics = {
        "slot_acc": slot_acc,
        "accuracy": jnp.mean(slot_acc),
        "expected_accept_len": expected_accept_length(slot_acc),
        "mean_accept_len": 1.0 + jnp.sum(leading_run * aw) / blocks,
        "correct": correct,  # [b, nb, B-1]: per block and slot (held-out evaluation, export check)
        "pred": pred.reshape(b, nb, bs - 1),  # [b, nb, B-1]: the draft's argmax (held-out evaluation at T > 0)
    }
    return loss, metrics


def _features_to_float(features: jax.Array) -> jax.Array:
    """Cache features travel as bf16 bit patterns (half the host->device bytes); exact on device."""
    if features.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(features, jnp.bfloat16).astype(jnp.float32)
    return features.astype(jnp.float32)


def _draft_hidden(module: Any, batch: dict[str, jax.Array], embed: jax.Array, mask_token_id: int) -> jax.Array:
    """Run the draft on one (mini)batch: blocks ``[anchor, MASK*(B-1)]`` embedded with the frozen table."""
    feats = _features_to_float(batch["context_features"])
    target_ids, anchors = batch["target_ids"], batch["anchor_positions"]
    b, c = feats.shape[:2]
    bs = target_ids.shape[-1]
    ctx_pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[None], (b, c))
    tokens = jnp.concatenate(
        [target_ids[..., :1], jnp.full((*target_ids.shape[:-1], bs - 1), mask_token_id, jnp.int32)], axis=-1)
    block_emb = jnp.take(jax.lax.stop_gradient(embed), tokens, axis=0)
    block_pos = anchors[..., None] + jnp.arange(bs, dtype=jnp.int32)
    return module(feats, ctx_pos, block_emb, block_pos, anchors)


def dflash_batch_loss(
    module: Any,
    batch: dict[str, jax.Array],
    embed: jax.Array,
    lm_head: jax.Array,
    *,
    mesh: Any,
    mask_token_id: int,
    weights: tuple[float, ...],
    vocab_chunk_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The draft's loss and metrics on one (mini)batch: what a training step differentiates.

    One function for the optimizer step and for everything that must measure the same thing
    (the tests' gradient checks, held-out evaluation).
    """
    w = jnp.asarray(np.asarray(weights, dtype=np.float32))
    hidden = _draft_hidden(module, batch, embed, mask_token_id)
    return dflash_loss_and_metrics(hidden, batch["target_ids"], jax.lax.stop_gradient(lm_head), w,
                                   batch["anchor_weights"], mesh=mesh, vocab_chunk_size=vocab_chunk_size)


def dflash_training_step(
    state: Any,
    batch: dict[str, jax.Array],
    embed: jax.Array,
    lm_head: jax.Array,
    *,
    mesh: Any,
    mask_token_id: int,
    weights: tuple[float, ...],
    vocab_chunk_size: int,
    gradient_accumulation_steps: int,
    scheduler: Any,
) -> tuple[Any, Any]:
    """One optimizer step (the function easydel's loop calls through ``configure_functions``).

    Uses easydel's own ``minibatch_call`` (gradient accumulation) and
    ``update_state_respectfully`` (optimizer update) so the state, step counter and
    learning-rate schedule behave as in easydel's stock ``training_step``.
    """
    from easydel.infra.loss_utils import LossMetrics
    from easydel.trainers.training_utils import (
        make_assertions_and_get_sizes,
        minibatch_call,
        update_metrics,
        update_state_respectfully,
    )

    _, minibatch_size, _ = make_assertions_and_get_sizes(
        batch=batch, gradient_accumulation_steps=gradient_accumulation_steps, batch_partition_spec=BATCH_SPEC)

    def loss_fn(tree: Any, minibatch: dict[str, jax.Array]) -> tuple[jax.Array, Any]:
        loss, m = dflash_batch_loss(state.merge(tree), minibatch, embed, lm_head, mesh=mesh,
                                    mask_token_id=mask_token_id, weights=weights, vocab_chunk_size=vocab_chunk_size)
        other = {f"slot_acc/{k + 1}": m["slot_acc"][k] for k in range(m["slot_acc"].shape[0])}
        other["expected_accept_len"] = m["expected_accept_len"]
        other["mean_accept_len"] = m["mean_accept_len"]
        return loss, LossMetrics(loss=loss, accuracy=m["accuracy"], other_metrics=other)

    gradients, metrics = minibatch_call(state=state, batch=batch, minibatch_size=minibatch_size,
                                        grad_fn=jax.value_and_grad(loss_fn, has_aux=True))
    metrics = update_metrics(metrics=metrics, learning_rate_fn=scheduler, step=state.step, gradients=gradients)
    metrics.grad_norms = None  # a per-parameter tree; the max/mean norms are kept
    state = update_state_respectfully(state=state, gradients=gradients, loss_config=None, metrics=metrics)
    return state, metrics


FROZEN_TABLE_SPEC = P(TP, None)
"""``embed_tokens`` / ``lm_head`` ``[V, H]``: vocab rows over tp (the chunked CE reads its shard)."""
BATCH_SPEC = P(DP)
"""Every batch array: rows over dp."""


def make_train_step(mesh: Any, state_shardings: Any, *, mask_token_id: int, weights: tuple[float, ...],
                    vocab_chunk_size: int, gradient_accumulation_steps: int, scheduler: Any) -> Any:
    """:func:`dflash_training_step`, jitted with the trainer's shardings; the state is donated.

    ``fn(state, batch, embed, lm_head) -> (state, metrics)``. One definition for the trainer
    (:meth:`DFlashTrainer.configure_functions`) and the TPU planner (:mod:`dflash_gptoss.planning.tpu_plan`),
    so a plan compiles exactly the step a run executes.
    """
    table = NamedSharding(mesh, FROZEN_TABLE_SPEC)
    step = partial(dflash_training_step, mesh=mesh, mask_token_id=mask_token_id, weights=weights,
                   vocab_chunk_size=vocab_chunk_size, gradient_accumulation_steps=gradient_accumulation_steps,
                   scheduler=scheduler)
    return jax.jit(step, in_shardings=(state_shardings, NamedSharding(mesh, BATCH_SPEC), table, table),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


__all__ = ["BATCH_SPEC", "FROZEN_TABLE_SPEC", "default_loss_decay_gamma", "dflash_batch_loss",
           "dflash_loss_and_metrics", "dflash_training_step", "expected_accept_length", "make_train_step",
           "resolve_loss_decay_gamma", "slot_weights"]
