"""Cache-first DFlash draft training as an easydel ``Trainer`` subclass (DESIGN.md, "Training").

No teacher forward runs here: every step reads the teacher cache (context features, anchor
tokens, the teacher's greedy labels) and trains only the draft (``fc``, norms, layers). The
target's ``embed_tokens`` and ``lm_head`` are read once from the teacher snapshot and stay
frozen: they are passed to the step function as extra (non-differentiated) arguments, never
parameters of the state, so the optimizer cannot touch them and checkpoints stay draft-only.

How easydel 0.3.0 is plugged (facts found in ``easydel/trainers``):

* ``BaseTrainer.__init__`` runs ``initialize_trainer_utils`` -> ``_configure_dataloaders``
  (calls our :meth:`DFlashTrainer.configure_dataloaders`), ``_configure_model`` (optimizer and
  scheduler from the ``TrainingArguments``), ``_configure_state`` (shards the state by the
  model's partition rules, sets ``state_shardings``), ``_configure_functions`` (calls our
  :meth:`DFlashTrainer.configure_functions`). Everything the two overrides need is therefore
  set BEFORE ``super().__init__``.
* ``Trainer._execute_train_step`` calls ``sharded_training_step_function(state, batch,
  *self._train_shared_fn_extra_args, *self._train_shared_fn_static_args)`` and expects
  ``(state, LossMetrics)``; we put the frozen tables in ``_train_shared_fn_extra_args`` and
  bake every static setting into the jitted function (empty static args).
* ``_get_next_batch`` re-``iter``s the loader on ``StopIteration``; resume fast-forwards the
  iterator by the saved step count. Our loader is an infinite, deterministic stream (epoch
  ``e`` uses the dataset's seeded permutation, anchors are drawn from ``rng([seed, step])``), so
  a resumed run sees exactly the batches an uninterrupted run would.
* ``StepMetrics.calculate`` logs ``loss``, ``accuracy``, ``learning_rate`` and everything in
  ``LossMetrics.other_metrics`` (our per-slot accuracies and acceptance lengths), and
  ``train-mlperf/throughput = training_batch_size * max_length / execution_time``: ``max_length``
  is set to the supervised slots per row, so that figure is supervised draft tokens per second.
* Gradient accumulation: easydel's ``minibatch_call`` slices one loaded batch of
  ``total_batch_size * gradient_accumulation_steps`` rows into minibatches of
  ``total_batch_size`` rows and averages gradients (we reuse it).
* Checkpoints: ``save_directory/model_name/run-<step>/`` every ``save_steps``; with
  ``resume_if_possible`` the base ``__init__`` reloads the latest one (``find_latest_checkpoint``)
  with ``model_task=model.model_task``; a FAILED reload only logs a warning and starts fresh,
  so :func:`build_trainer` checks the resumed step itself.

Gradient averaging over ``dp``: the batch is sharded over ``dp`` and the loss is the mean over
the GLOBAL batch inside one ``jit``, so XLA's SPMD partitioner inserts the cross-``dp``
reduction of the gradient; no explicit ``pmean`` (``tests/test_trainer.py`` checks that one step
on dp=8 x tp=1 equals dp=2 x tp=4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dflash_gptoss.easydel_dflash_cache import CacheMismatchError, DFlashCacheDataset, valid_anchor_range

__all__ = [
    "DFlashTrainer",
    "DFlashTrainingSettings",
    "TrainerInputError",
    "anchor_positions_for_step",
    "build_trainer",
    "dflash_batch_loss",
    "export_checkpoint",
    "latest_checkpoint",
    "run_training",
    "dflash_loss_and_metrics",
    "expected_accept_length",
    "load_frozen_tables",
    "slot_weights",
]


class TrainerInputError(ValueError):
    """A setting the trainer cannot run with (the message names the value and the fix)."""


# ------------------------------------------------------------------------------- settings
@dataclass
class DFlashTrainingSettings:
    """Everything a run needs; the CLI maps its flags one to one onto these fields."""

    cache_dir: str
    teacher_snapshot_dir: str
    save_directory: str
    model_name: str = "dflash-draft"
    max_training_steps: int = 100
    total_batch_size: int = 8
    dp: int = 1
    tp: int = 1
    vocab_chunk_size: int = 8192
    save_steps: int | None = None
    log_steps: int = 10
    learning_rate: float = 3e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    num_draft_layers: int = 1
    loss_decay_gamma: float | None = None  # None: default_loss_decay_gamma(block_size)
    anchors_per_window: int = 16
    block_size: int | None = None
    mask_token_id: int | None = None
    gradient_accumulation_steps: int = 1
    seed: int = 0
    resume: bool = False
    export_dir: str | None = None
    progress_bar: str = "tqdm"


# ------------------------------------------------------------------------------- loss math
def default_loss_decay_gamma(block_size: int) -> float:
    """The published recipes' decay: gamma 4 for block 8, 7 for block 16 (and above)."""
    return 4.0 if block_size <= 8 else 7.0


def slot_weights(block_size: int, gamma: float) -> np.ndarray:
    """Loss weight of slots 1..B-1: ``exp(-(k-1)/gamma)``; ``gamma == 0`` means uniform.

    Earlier slots weigh more because acceptance stops at the first miss (DESIGN.md).
    """
    k = np.arange(1, block_size, dtype=np.float64)
    if gamma < 0:
        raise TrainerInputError(f"loss_decay_gamma={gamma} must be >= 0 (0 = uniform weights).")
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
    every mean. Returns ``(loss, metrics)`` with per-slot accuracy ``[B-1]``, mean accuracy and
    both acceptance-length figures.
    """
    from dflash_gptoss.sharded_ce import chunked_sharded_cross_entropy

    b, nb, bs, h = hidden.shape
    labels = target_ids[..., 1:].astype(jnp.int32)
    nll, pred = chunked_sharded_cross_entropy(
        hidden[:, :, 1:, :].reshape(-1, h), lm_head, labels.reshape(-1), mesh=mesh,
        vocab_chunk_size=vocab_chunk_size, dp_axis="dp", tp_axis="tp",
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
        batch=batch, gradient_accumulation_steps=gradient_accumulation_steps, batch_partition_spec=P("dp"))

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


FROZEN_TABLE_SPEC = P("tp", None)
"""``embed_tokens`` / ``lm_head`` ``[V, H]``: vocab rows over tp (the chunked CE reads its shard)."""
BATCH_SPEC = P("dp")
"""Every batch array: rows over dp."""


def make_train_step(mesh: Any, state_shardings: Any, *, mask_token_id: int, weights: tuple[float, ...],
                    vocab_chunk_size: int, gradient_accumulation_steps: int, scheduler: Any) -> Any:
    """:func:`dflash_training_step`, jitted with the trainer's shardings; the state is donated.

    ``fn(state, batch, embed, lm_head) -> (state, metrics)``. One definition for the trainer
    (:meth:`DFlashTrainer.configure_functions`) and the TPU planner (:mod:`dflash_gptoss.tpu_plan`),
    so a plan compiles exactly the step a run executes.
    """
    table = NamedSharding(mesh, FROZEN_TABLE_SPEC)
    step = partial(dflash_training_step, mesh=mesh, mask_token_id=mask_token_id, weights=weights,
                   vocab_chunk_size=vocab_chunk_size, gradient_accumulation_steps=gradient_accumulation_steps,
                   scheduler=scheduler)
    return jax.jit(step, in_shardings=(state_shardings, NamedSharding(mesh, BATCH_SPEC), table, table),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


# ------------------------------------------------------------------------------- data
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
                      block_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{name: (shape, dtype)}`` of the global batch one step reads (what :func:`host_batch` builds).

    ``rows`` = total_batch_size x gradient accumulation; ``features_width`` = K x H; ``anchors``
    from :func:`anchors_per_row`. Features travel as bf16 bit patterns (uint16).
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


# ------------------------------------------------------------------------------- frozen tables
def _safetensors_files(snapshot: Path) -> list[Path]:
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [snapshot / n for n in names]
    files = sorted(snapshot.glob("*.safetensors"))
    if not files:
        raise TrainerInputError(f"no *.safetensors in --teacher-snapshot-dir {snapshot}.")
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
        raise TrainerInputError(f"teacher snapshot {snapshot_dir} lacks {missing}.")
    return wanted["model.embed_tokens.weight"], wanted["lm_head.weight"]


# ------------------------------------------------------------------------------- the trainer
def _rng_keys_on_mesh(model: Any) -> None:
    """Past one process: make the model's RNG keys global, replicated arrays.

    ``nnx.Rngs`` keys are single-device PRNG key arrays, and ``jax.device_put`` refuses to turn a key
    array into a multi-process array (easydel's ``shard_state`` does exactly that); the raw key data
    can be placed, then re-wrapped. One process needs nothing (device_put handles it).
    """
    from flax import nnx

    replicated = NamedSharding(model.mesh, P())
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.RngKey)):
        key = var[...]
        data = jax.device_put(np.asarray(jax.random.key_data(key)), replicated)
        var[...] = jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def _single_writer_checkpoint_files() -> None:
    """Past one process: only process 0 writes eformer's shared checkpoint JSON files.

    eformer 0.0.99 (under easydel 0.3.0) lets EVERY process write ``tensorstore_index.json`` and the
    other shared files of a checkpoint on a local path (``should_write_shared_checkpoint_files`` is
    "local path or process 0"), and the index is read-modify-written: on a filesystem the hosts
    share, one process can read the file while another rewrites it (seen: ``JSONDecodeError`` in
    ``tree_serialize_leaves``). The array shards are written by their owners either way.
    """
    from eformer.serialization import fsspec_utils

    fsspec_utils.should_write_shared_checkpoint_files = lambda path: jax.process_index() == 0


def _trainer_base() -> type:
    from easydel.trainers import Trainer

    return Trainer


class DFlashTrainer(_trainer_base()):  # type: ignore[misc]
    """easydel ``Trainer`` whose data is the teacher cache and whose step is the DFlash loss.

    Only :meth:`configure_dataloaders` and :meth:`configure_functions` are overridden; the loop,
    logging, progress bar, checkpointing and resume are easydel's.
    """

    def __init__(self, arguments: Any, model: Any, *, dataset: DFlashCacheDataset, embed: np.ndarray,
                 lm_head: np.ndarray, block_size: int, mask_token_id: int, loss_decay_gamma: float,
                 anchors_per_window: int, vocab_chunk_size: int, seed: int) -> None:
        self.cache = dataset
        self.block_size = int(block_size)
        self.mask_token_id = int(mask_token_id)
        self.anchors_per_window = int(anchors_per_window)
        self.vocab_chunk_size = int(vocab_chunk_size)
        self.loss_weights = tuple(float(x) for x in slot_weights(self.block_size, loss_decay_gamma))
        self.data_seed = int(seed)
        mesh = model.mesh
        self.frozen_embed = jax.device_put(jnp.asarray(embed, jnp.float32), NamedSharding(mesh, FROZEN_TABLE_SPEC))
        self.frozen_lm_head = jax.device_put(jnp.asarray(lm_head, jnp.float32), NamedSharding(mesh, FROZEN_TABLE_SPEC))
        self.batch_sharding = NamedSharding(mesh, BATCH_SPEC)
        self.history: list[dict[str, float]] = []
        super().__init__(arguments=arguments, model=model)

    def on_step_end(self, state: Any, metrics: Any, step: int) -> tuple[Any, Any]:
        """Keep every step's loss and acceptance figures (tests and the run summary read them)."""
        other = metrics.other_metrics or {}
        self.history.append({
            "step": int(step),
            "loss": float(metrics.loss),
            "accuracy": float(metrics.accuracy),
            "expected_accept_len": float(other.get("expected_accept_len", float("nan"))),
            "mean_accept_len": float(other.get("mean_accept_len", float("nan"))),
        })
        return super().on_step_end(state=state, metrics=metrics, step=step)

    def log_metrics(self, metrics: Any, pbar: Any, step: int, mode: str = "train", **kwargs: Any) -> Any:
        """Add ``tokens_per_second`` (supervised draft slots per second) to what easydel shows.

        easydel computes it as ``train-mlperf/throughput`` (``max_length`` is set to the slots per
        row) but filters every ``*-mlperf/*`` key out of the progress bar.
        """
        if isinstance(metrics, dict):
            for key in (f"{mode}-mlperf/throughput", "mlperf/throughput"):
                if key in metrics:
                    metrics = {**metrics, f"{mode}/tokens_per_second": float(metrics[key])}
                    break
        return super().log_metrics(metrics, pbar, step, mode, **kwargs)

    # --- data -----------------------------------------------------------------
    def rows_per_step(self) -> int:
        """Rows one optimizer step reads: ``total_batch_size * gradient_accumulation_steps``."""
        return int(self.arguments.total_batch_size) * int(self.arguments.gradient_accumulation_steps)

    def _stream(self) -> Iterator[dict[str, jax.Array]]:
        """Infinite deterministic stream of global (dp-sharded) batches, epoch after epoch.

        Each process reads only rows ``[lo, hi)`` of every global batch: those its own devices hold
        under the dp sharding (all rows on one host).
        """
        from dflash_gptoss.distributed import process_row_range

        g = self.rows_per_step()
        lo, hi = process_row_range(self.batch_sharding, (g,))
        step, epoch = 0, 0
        while True:
            perm = self.cache.epoch_permutation(epoch)
            for start in range(0, self.cache.num_items - g + 1, g):
                local = host_batch(self.cache, perm[start + lo: start + hi], block_size=self.block_size,
                                   anchors_per_window=self.anchors_per_window, seed=self.data_seed, step=step,
                                   row_offset=lo, global_rows=g)
                yield {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (g, *v.shape[1:]))
                       for k, v in local.items()}
                step += 1
            epoch += 1

    def configure_dataloaders(self) -> Any:
        """The cache stream (infinite; ``max_training_steps`` ends the run). No eval loader."""
        from easydel.trainers.base_trainer import TrainerConfigureDataloaderOutput, _ReiterableDataLoader

        return TrainerConfigureDataloaderOutput(
            dataloader_train=_ReiterableDataLoader(self._stream),
            max_training_steps=int(self.arguments.max_training_steps),
            dataloader_eval=None,
            max_evaluation_steps=0,
        )

    # --- step -----------------------------------------------------------------
    def configure_functions(self) -> Any:
        """Jit :func:`dflash_training_step` with the state's shardings and dp-sharded batches."""
        from easydel.trainers.base_trainer import TrainerConfigureFunctionOutput

        mesh = self.model.mesh
        train_fn = make_train_step(mesh, self.state_shardings, mask_token_id=self.mask_token_id,
                                   weights=self.loss_weights, vocab_chunk_size=self.vocab_chunk_size,
                                   gradient_accumulation_steps=int(self.arguments.gradient_accumulation_steps),
                                   scheduler=self.scheduler)
        self._train_shared_fn_static_args = ()
        self._train_shared_fn_extra_args = (self.frozen_embed, self.frozen_lm_head)
        self.arguments.ensure_checkpoint_path()
        return TrainerConfigureFunctionOutput(
            sharded_training_step_function=train_fn,
            sharded_evaluation_step_function=None,
            mesh=mesh,
            checkpoint_manager=self.arguments.get_streaming_checkpointer(),
        )


# ------------------------------------------------------------------------------- assembly
def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainerInputError(f"{name}={value!r} must be an integer >= 1.")


def _default_mask_token_id(snapshot_dir: str, vocab_size: int) -> int:
    """The project's MASK default (``config.default_mask_token_id``), as a trainer input error."""
    from dflash_gptoss.config import default_mask_token_id

    try:
        return default_mask_token_id(vocab_size, snapshot_dir)
    except ValueError as exc:
        raise TrainerInputError(f"{snapshot_dir}: {exc}") from exc


def validate_settings(s: DFlashTrainingSettings) -> None:
    """Cheap checks (no JAX compilation), so bad input fails in a second with a clear message."""
    for name in ("max_training_steps", "total_batch_size", "dp", "tp", "vocab_chunk_size", "log_steps",
                 "num_draft_layers", "anchors_per_window", "gradient_accumulation_steps"):
        _check_positive(name, getattr(s, name))
    if s.save_steps is not None:
        _check_positive("save_steps", s.save_steps)
    if s.total_batch_size % s.dp:
        raise TrainerInputError(
            f"total_batch_size={s.total_batch_size} is not divisible by dp={s.dp}: the global batch is sharded "
            f"over dp; use a multiple of {s.dp}.")
    devices = jax.device_count()  # global: every process's devices
    if s.dp * s.tp != devices:
        raise TrainerInputError(f"dp*tp={s.dp}*{s.tp}={s.dp * s.tp} must equal the {devices} visible devices"
                                + (f" of all {jax.process_count()} processes." if jax.process_count() > 1 else "."))
    procs = jax.process_count()
    if s.total_batch_size % procs:
        raise TrainerInputError(
            f"total_batch_size={s.total_batch_size} is not divisible by the {procs} processes: each process feeds "
            f"its share of the global batch; use a multiple of {procs} (and of dp={s.dp}).")
    if s.learning_rate <= 0 or not math.isfinite(s.learning_rate):
        raise TrainerInputError(f"learning_rate={s.learning_rate} must be a positive number.")
    if s.weight_decay < 0:
        raise TrainerInputError(f"weight_decay={s.weight_decay} must be >= 0.")
    if s.warmup_steps < 0:
        raise TrainerInputError(f"warmup_steps={s.warmup_steps} must be >= 0.")
    if s.loss_decay_gamma is not None:
        slot_weights(2, s.loss_decay_gamma)
    for name in ("cache_dir", "teacher_snapshot_dir"):
        if not Path(getattr(s, name)).is_dir():
            raise TrainerInputError(f"{name} {getattr(s, name)} is not a directory.")


def _constant_with_warmup(learning_rate: float, warmup_steps: int) -> Any:
    """``custom_scheduler`` for eformer: linear 0 -> lr over ``warmup_steps`` (like its own warmup), then flat."""
    import optax

    def make(_total_steps: int) -> Any:
        if warmup_steps <= 0:
            return optax.constant_schedule(learning_rate)
        return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps),
                                     optax.constant_schedule(learning_rate)], [warmup_steps])

    return make


_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "none"}


def training_arguments(s: DFlashTrainingSettings, *, anchors: int, block_size: int) -> Any:
    """easydel ``TrainingArguments`` of a run (optimizer, schedule, logging, checkpoints).

    ``anchors`` (blocks per row) only sets ``max_length``, so that easydel's throughput figure is
    supervised draft tokens per second. The TPU planner builds its optimizer from these too.
    """
    from easydel.trainers import TrainingArguments

    return TrainingArguments(
        save_directory=s.save_directory,
        model_name=s.model_name,
        max_training_steps=s.max_training_steps,
        total_batch_size=s.total_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        scheduler=_SCHEDULES[s.lr_schedule],
        learning_rate_end=0.0 if s.lr_schedule == "linear" else None,  # eformer: linear requires an end value
        # eformer refuses warmup without a decaying scheduler, so "constant" brings its own warmup.
        warmup_steps=0 if s.lr_schedule == "constant" else s.warmup_steps,
        custom_scheduler=(_constant_with_warmup(s.learning_rate, s.warmup_steps)
                          if s.lr_schedule == "constant" else None),
        weight_decay=s.weight_decay,
        optimizer="adamw",
        log_steps=s.log_steps,
        report_steps=s.log_steps,
        save_steps=s.save_steps,
        resume_if_possible=s.resume,
        do_last_save=True,
        use_wandb=False,
        track_memory=False,
        use_data_collator=False,
        max_length=anchors * (block_size - 1),  # supervised slots per row: throughput = draft tokens/s
        progress_bar_type=s.progress_bar,
        shuffle_train_dataset=False,
        do_eval=False,
    )


def build_trainer(s: DFlashTrainingSettings) -> tuple[DFlashTrainer, Any]:
    """Validate everything, build the draft, the easydel ``TrainingArguments`` and the trainer.

    Returns ``(trainer, draft_config)``. Raises :class:`TrainerInputError` /
    ``CacheMismatchError`` before any compilation when the inputs cannot work together.
    """
    from transformers import AutoConfig

    from dflash_gptoss.config import make_draft_config
    from dflash_gptoss.easydel_dflash_draft_model import create_draft_model

    validate_settings(s)
    if s.lr_schedule not in _SCHEDULES:
        raise TrainerInputError(f"lr_schedule={s.lr_schedule!r}; choose one of {sorted(_SCHEDULES)}.")
    teacher_cfg = AutoConfig.from_pretrained(s.teacher_snapshot_dir)
    vocab = int(teacher_cfg.vocab_size)
    if vocab % s.tp:
        raise TrainerInputError(
            f"vocab_size={vocab} is not divisible by tp={s.tp}: lm_head rows are sharded over tp; "
            f"pick a tp that divides {vocab}.")
    ds = DFlashCacheDataset(s.cache_dir, seed=s.seed, bf16_as_bits=True)
    meta = ds.meta
    ds.validate(teacher_config=teacher_cfg)
    block_size = int(s.block_size or meta["block_size"])
    rows = s.total_batch_size * s.gradient_accumulation_steps
    if rows > ds.num_items:
        raise TrainerInputError(f"one step needs {rows} cache rows but {s.cache_dir} holds {ds.num_items}.")
    mask_id = s.mask_token_id if s.mask_token_id is not None else _default_mask_token_id(s.teacher_snapshot_dir, vocab)
    draft_config = make_draft_config(teacher_cfg, num_hidden_layers=s.num_draft_layers, block_size=block_size,
                                     mask_token_id=mask_id, layer_ids=list(meta["target_layer_ids"]))
    ds.validate(draft_config=draft_config)  # block size / layer ids / hidden size vs the cache
    embed, lm_head = load_frozen_tables(s.teacher_snapshot_dir)
    if embed.shape != (vocab, int(teacher_cfg.hidden_size)) or lm_head.shape != embed.shape:
        raise CacheMismatchError(f"teacher tables {embed.shape}/{lm_head.shape} do not match its config.")
    model = create_draft_model(draft_config, dp=s.dp, tp=s.tp, seed=s.seed)
    if jax.process_count() > 1:
        _rng_keys_on_mesh(model)
        _single_writer_checkpoint_files()
    nb = anchors_per_row(ds.layout, int(meta["ctx_len"]), block_size, s.anchors_per_window)
    args = training_arguments(s, anchors=nb, block_size=block_size)
    gamma = s.loss_decay_gamma if s.loss_decay_gamma is not None else default_loss_decay_gamma(block_size)
    trainer = DFlashTrainer(args, model, dataset=ds, embed=embed, lm_head=lm_head, block_size=block_size,
                            mask_token_id=mask_id, loss_decay_gamma=gamma,
                            anchors_per_window=s.anchors_per_window, vocab_chunk_size=s.vocab_chunk_size,
                            seed=s.seed)
    if s.resume:
        latest = latest_checkpoint(s.save_directory, s.model_name)
        resumed = int(jax.device_get(trainer.model_state.step))
        if latest is not None and resumed == 0:
            raise TrainerInputError(f"--resume: easydel could not reload {latest} (see the warning above); refusing "
                                    "to silently start from scratch. Move the checkpoint away or fix it.")
    return trainer, draft_config


def latest_checkpoint(save_directory: str | Path, model_name: str) -> Path | None:
    """The ``run-<step>`` folder with the highest step under ``save_directory/model_name``, if any."""
    root = Path(save_directory) / model_name
    runs = [p for p in root.glob("run-*") if p.is_dir() and p.name[4:].isdigit()]
    return max(runs, key=lambda p: int(p.name[4:])) if runs else None


def export_checkpoint(checkpoint_dir: str | Path, draft_config: Any, out_dir: str | Path, *,
                      dp: int | None = None, tp: int = 1, dtype: str = "float32") -> Path:
    """Any saved ``run-<step>`` -> a torch draft folder (``config.json`` + ``model.safetensors``).

    ``dp`` defaults to every device over ``tp`` (an easydel mesh must cover all visible devices).
    """
    from dflash_gptoss.easydel_dflash_draft_model import load_draft_state
    from dflash_gptoss.export_draft import export_nnx_draft

    dp = jax.device_count() // tp if dp is None else dp
    state = load_draft_state(checkpoint_dir, dp=dp, tp=tp)
    return export_nnx_draft(state.model, draft_config, out_dir, dtype=dtype)


def run_training(s: DFlashTrainingSettings, built: tuple[DFlashTrainer, Any] | None = None) -> dict[str, Any]:
    """Build (unless ``built`` by :func:`build_trainer`), train with easydel's loop, export; a summary dict.

    ``export_dir`` set: the final state's draft is written as a torch folder the benchmark loads.
    Past one process every process takes part in gathering the weights and process 0 writes.
    """
    from dflash_gptoss.distributed import is_main_process, sync
    from dflash_gptoss.easydel_dflash_draft_model import param_arrays
    from dflash_gptoss.export_draft import export_nnx_draft

    trainer, draft_config = built if built is not None else build_trainer(s)
    start_step = int(jax.device_get(trainer.model_state.step))
    output = trainer.train()
    state = getattr(output, "state", None) or trainer.model_state
    summary: dict[str, Any] = {
        "start_step": start_step,
        "final_step": int(jax.device_get(state.step)),
        "history": trainer.history,
        "checkpoint": str(latest_checkpoint(s.save_directory, s.model_name)),
    }
    if s.export_dir:
        from jax.experimental import multihost_utils

        params = {k: v if v.is_fully_addressable else multihost_utils.process_allgather(v, tiled=True)
                  for k, v in param_arrays(state.model).items()}  # a collective past one process
        if is_main_process():
            export_nnx_draft(params, draft_config, s.export_dir)
        sync("dflash-export-written")
        summary["export_dir"] = str(Path(s.export_dir))
    return summary
