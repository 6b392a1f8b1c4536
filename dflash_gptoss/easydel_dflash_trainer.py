"""Cache-first DFlash draft training as an easydel ``Trainer`` subclass (docs/design.md, "Training").

No teacher forward runs here: every step reads the teacher cache (context features, anchor
tokens, the teacher's greedy labels) and trains only the draft (``fc``, norms, layers). The
target's ``embed_tokens`` and ``lm_head`` are read once from the teacher snapshot and stay
frozen: they are passed to the step function as extra (non-differentiated) arguments, never
parameters of the state, so the optimizer cannot touch them and checkpoints stay draft-only.

How easydel 0.3.0 is plugged (facts found in ``easydel/trainers``):

* ``BaseTrainer.__init__`` runs ``initialize_trainer_utils`` -> ``_configure_dataloaders``
  (calls :meth:`DFlashTrainer.configure_dataloaders`), ``_configure_model`` (optimizer and
  scheduler from the ``TrainingArguments``), ``_configure_state`` (shards the state by the
  model's partition rules, sets ``state_shardings``), ``_configure_functions`` (calls
  :meth:`DFlashTrainer.configure_functions`). Everything the two overrides need is therefore
  set BEFORE ``super().__init__``.
* ``Trainer._execute_train_step`` calls ``sharded_training_step_function(state, batch,
  *self._train_shared_fn_extra_args, *self._train_shared_fn_static_args)`` and expects
  ``(state, LossMetrics)``; the frozen tables go in ``_train_shared_fn_extra_args`` and
  bake every static setting into the jitted function (empty static args).
* ``_get_next_batch`` re-``iter``s the loader on ``StopIteration``; resume fast-forwards the
  iterator by the saved step count. This trainer's loader is an infinite, deterministic stream (epoch
  ``e`` uses the dataset's seeded permutation, anchors are drawn from ``rng([seed, step])``), so
  a resumed run sees exactly the batches an uninterrupted run would.
* ``StepMetrics.calculate`` logs ``loss``, ``accuracy``, ``learning_rate`` and everything in
  ``LossMetrics.other_metrics`` (the draft's per-slot accuracies and acceptance lengths), and
  ``train-mlperf/throughput = training_batch_size * max_length / execution_time``: ``max_length``
  is set to the supervised slots per row, so that figure is supervised draft tokens per second.
* Gradient accumulation: easydel's ``minibatch_call`` slices one loaded batch of
  ``total_batch_size * gradient_accumulation_steps`` rows into minibatches of
  ``total_batch_size`` rows and averages gradients (the trainer uses it as is).
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

import contextlib
import functools
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dflash_gptoss.cli_types import check_positive_int
from dflash_gptoss.easydel_dflash_cache import CacheMismatchError, DFlashCacheDataset
from dflash_gptoss.train_batches import anchors_per_row, host_batch, load_frozen_tables
from dflash_gptoss.train_settings import DFlashTrainingSettings
from dflash_gptoss.train_step import (
    BATCH_SPEC,
    FROZEN_TABLE_SPEC,
    make_train_step,
    resolve_loss_decay_gamma,
    slot_weights,
)

__all__ = [
    "DFlashTrainer",
    "DFlashTrainingSettings",
    "TrainerInputError",
    "build_trainer",
    "export_checkpoint",
    "latest_checkpoint",
    "run_training",
]


class TrainerInputError(ValueError):
    """A setting the trainer cannot run with (the message names the value and the fix)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only); the message names the last good one."""


class NonFiniteTrainingError(RuntimeError):
    """A step's loss or gradient norm is NaN or Inf: training stops there, and nothing of that step is saved."""


def _is_write_failure(e: BaseException) -> bool:
    """An OSError, or tensorstore's error text for one, anywhere in the exception's chain."""
    while e is not None:
        if isinstance(e, OSError) or any(t in str(e) for t in ("No space left", "Read-only file system",
                                                                "Permission denied", "Disk quota")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _write_failure_reason(e: BaseException) -> str:
    """The OSError's reason (``preflight.write_failure_reason``) or, for tensorstore's, its first line."""
    from dflash_gptoss.run_safety.preflight import write_failure_reason

    first = e
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return write_failure_reason(e) if e is not None else str(first).splitlines()[0][:300]


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


@functools.cache
def _logger() -> Any:
    """easydel's logger for this module, made once (every ``get_logger`` call adds another handler)."""
    from easydel.utils.helpers import get_logger

    return get_logger(__name__)


@contextlib.contextmanager
def _resume_exactly(checkpoint: Path | None) -> Iterator[None]:
    """Make easydel resume from ``checkpoint`` (the one this module verified) and nothing else.

    easydel 0.3.0 resumes from eformer's ``find_latest_checkpoint``, which takes the newest folder holding
    a ``metadata.json`` by its timestamp: a half-written ``run-<step>`` or one the user moved aside as
    damaged would be picked. The base ``__init__`` imports that function when it runs, so it is replaced
    for the duration of the call.
    """
    from eformer.serialization import checkpointer

    original = checkpointer.find_latest_checkpoint
    checkpointer.find_latest_checkpoint = lambda base_path: None if checkpoint is None else str(checkpoint)
    try:
        yield
    finally:
        checkpointer.find_latest_checkpoint = original


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
                 anchors_per_window: int, vocab_chunk_size: int, seed: int, resume_from: Path | None = None,
                 eval_set: Any = None, eval_cache: DFlashCacheDataset | None = None, eval_steps: int | None = None,
                 keep_best: bool = False, eval_top: Any = None) -> None:
        self.cache = dataset
        self.eval_set, self.eval_steps, self.keep_best = eval_set, eval_steps, bool(keep_best)
        self.eval_top = eval_top  # heldout_eval.TeacherTopK for --eval-temperature
        self.eval_cache = eval_cache
        self.eval_history: list[dict[str, Any]] = []
        self.best: tuple[int, Any] | None = None  # (step, a device copy of its parameters) under --keep-best
        self._evaluators: dict[int, Any] = {}
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
        with _resume_exactly(resume_from):
            super().__init__(arguments=arguments, model=model)
        self.first_step = int(jax.device_get(self.model_state.step))

    # --- held-out evaluation ----------------------------------------------------
    def evaluator(self, eval_set: Any = None) -> Any:
        """A :class:`HeldoutEvaluator` on this trainer's mesh and shardings (the run's eval set by default)."""
        from dflash_gptoss.train_heldout_eval import HeldoutEvaluator

        eval_set = self.eval_set if eval_set is None else eval_set
        if id(eval_set) not in self._evaluators:
            self._evaluators[id(eval_set)] = HeldoutEvaluator(
                self.model_state, eval_set, embed=self.frozen_embed, lm_head=self.frozen_lm_head,
                batch_sharding=self.batch_sharding, graph_shardings=self.state_shardings.graphstate,
                table_sharding=NamedSharding(self.model.mesh, FROZEN_TABLE_SPEC),
                loss_kwargs=dict(mesh=self.model.mesh, mask_token_id=self.mask_token_id, weights=self.loss_weights,
                                 vocab_chunk_size=self.vocab_chunk_size),
                top=self.eval_top if eval_set is self.eval_set else None)
        return self._evaluators[id(eval_set)]

    def _should_evaluate(self, step: int) -> bool:
        """The first step of this run, every ``eval_steps``, and the last step."""
        if self.eval_set is None:
            return False
        return (step == self.first_step + 1 or step == int(self.arguments.max_training_steps)
                or (self.eval_steps is not None and step % self.eval_steps == 0))

    def _evaluate(self, state: Any, step: int) -> None:
        entry, _ = self.evaluator().evaluate(state.graphstate, step)
        self.eval_history.append(entry)
        if self.keep_best and (self.best is None or entry["eval_accept_len_mean"] > self._best_mean()):
            self.best = (int(step), jax.tree.map(lambda x: x.copy(), state.graphstate))
        _logger().info(
            f"held-out eval at step {step}: loss {entry['eval_loss']:.4f}, accepted length per verify step mean "
            f"{entry['eval_accept_len_mean']:.3f} / median {entry['eval_accept_len_median']:g} / p90 "
            f"{entry['eval_accept_len_p90']:g} over {entry['eval_walk_steps']} steps (per position "
            f"{entry['eval_accept_len_position_mean']:.3f} over {entry['eval_blocks']} blocks; "
            f"{entry['eval_seconds']:.2f} s)"
            + (f"; at temperature {entry['eval_temperature']:g} expected accepted length "
               f"{sampled_accept_text(entry)}" if "eval_temperature" in entry else "")
            + (f"; best so far: step {self.best[0]}" if self.best is not None else ""))

    def _best_mean(self) -> float:
        return next(e["eval_accept_len_mean"] for e in self.eval_history if e["step"] == self.best[0])

    def on_step_end(self, state: Any, metrics: Any, step: int) -> tuple[Any, Any]:
        """Keep every step's loss and acceptance figures (tests and the run summary read them), and run the
        held-out evaluation when it is due."""
        if self._should_evaluate(int(step)):
            self._evaluate(state, int(step))
        other = metrics.other_metrics or {}
        self.history.append({
            "step": int(step),
            "loss": float(metrics.loss),
            "accuracy": float(metrics.accuracy),
            "expected_accept_len": float(other.get("expected_accept_len", float("nan"))),
            "mean_accept_len": float(other.get("mean_accept_len", float("nan"))),
        })
        state, metrics = super().on_step_end(state=state, metrics=metrics, step=step)
        self._stop_if_asked(state, int(step))
        return state, metrics

    def _stop_if_asked(self, state: Any, step: int) -> None:
        """After a completed step, a pending SIGINT/SIGTERM saves that step (verified manifest) and stops.

        The step is complete and finite (``apply_training_hooks`` ran), so its checkpoint is what an
        uninterrupted run would hold there: ``--resume`` continues exactly (``run_safety/stop_signals`` module doc).
        """
        from dflash_gptoss.run_safety.stop_signals import StopRequested, requested

        flag = requested()
        if flag is None:
            return
        self._save_checkpoint_for_step(state, step=step, force=True)
        saved = Path(self.arguments.save_directory) / self.arguments.model_name / f"run-{step}"
        raise StopRequested(flag.signum, f"after training step {step} of {int(self.arguments.max_training_steps)}",
                            f"checkpoint {saved} is saved and verified (nothing was exported).")

    def _save_checkpoint_for_step(self, state: Any, *, step: int, force: bool = False, **kwargs: Any) -> Any:
        """easydel's save, then the checkpoint's manifest (written last: only a finished save has one).

        A failed save (a full disk, above all) removes the half-written ``run-<step>`` and raises
        :class:`CheckpointWriteError` naming the newest good checkpoint, which stays untouched.
        """
        from dflash_gptoss.distributed import is_main_process, sync
        from dflash_gptoss.run_safety.integrity import write_manifest
        from dflash_gptoss.train_checkpoints import CHECKPOINT_KIND, newest_good

        target = Path(self.arguments.save_directory) / self.arguments.model_name / f"run-{int(step)}"
        try:
            saved = super()._save_checkpoint_for_step(state, step=step, force=force, **kwargs)
            if saved is not None:
                sync(f"dflash-checkpoint-{step}-saved")  # every process's shards are on disk
                if is_main_process():
                    write_manifest(saved, kind=CHECKPOINT_KIND, extra={"step": int(step)})
                sync(f"dflash-checkpoint-{step}-manifest")
        except Exception as e:
            if not _is_write_failure(e):
                raise
            if is_main_process():
                shutil.rmtree(target, ignore_errors=True)
            good = newest_good(target.parent)
            raise CheckpointWriteError(
                f"saving checkpoint {target} failed: {_write_failure_reason(e)}. The half-written {target.name} "
                "was removed; " + (f"the newest good checkpoint is {good} (verified): free space, then rerun "
                                   "with --resume." if good else "no earlier checkpoint of this run exists.")
            ) from e
        return saved

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

    def rows_of_step(self, step: int) -> np.ndarray:
        """The cache rows the batch of optimizer step ``step`` (1-based) read, as :meth:`_stream` draws them."""
        g = self.rows_per_step()
        per_epoch = self.cache.num_items // g
        epoch, index = divmod(int(step) - 1, per_epoch)
        return self.cache.epoch_permutation(epoch)[index * g: (index + 1) * g]

    # --- non-finite steps ---------------------------------------------------------
    def on_step_start(self, state: Any, step: int) -> Any:
        self._step_in_flight = int(step) + 1
        return super().on_step_start(state=state, step=step)

    def apply_training_hooks(self, metrics: Any) -> Any:
        """Stop at the first step whose loss or gradient norm is not finite, before it is logged or saved.

        The parameters after such a step are not finite either, so no checkpoint, evaluation or export
        may follow: the error names the step, the cache rows its batch read and the last good checkpoint.
        """
        values = {"loss": metrics.loss, "gradient norm": metrics.max_grad_norm}
        bad = {k: float(v) for k, v in values.items() if v is not None and not math.isfinite(float(v))}
        if bad:
            from dflash_gptoss.train_checkpoints import newest_good

            step = getattr(self, "_step_in_flight", None)
            rows = self.rows_of_step(step).tolist() if step is not None else []
            shown = ", ".join(map(str, rows[:16])) + (f", ... ({len(rows)} rows)" if len(rows) > 16 else "")
            good = newest_good(Path(self.arguments.save_directory) / self.arguments.model_name)
            what = " and ".join(f"the {k} is {v}" for k, v in bad.items())
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: {what}. Its batch read rows [{shown}] of the cache "
                f"{self.cache.cache_dir}; nothing of this step was saved. "
                + (f"The last good checkpoint is {good} (verified): continue from it with --resume, with a lower "
                   "--learning-rate if the features are finite (scripts/dflash_verify.py checks the cache)."
                   if good is not None else "No checkpoint of this run was saved before it."))
        return super().apply_training_hooks(metrics)

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
    check_positive_int(name, value, TrainerInputError)


def _default_mask_token_id(snapshot_dir: str, vocab_size: int) -> int:
    """The project's MASK default (``config.default_mask_token_id``), as a trainer input error."""
    from dflash_gptoss.draft_config import default_mask_token_id

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
    if s.eval_steps is not None:
        _check_positive("eval_steps", s.eval_steps)
        if not s.eval_cache_dir:
            raise TrainerInputError("--eval-steps needs --eval-cache-dir (the held-out cache to evaluate on).")
    if s.keep_best and not s.eval_cache_dir:
        raise TrainerInputError("--keep-best needs --eval-cache-dir: the best checkpoint is chosen by its held-out "
                                "accepted length; build a held-out cache (README) or drop --keep-best.")
    if s.eval_cache_dir and not Path(s.eval_cache_dir).is_dir():
        raise TrainerInputError(f"--eval-cache-dir {s.eval_cache_dir} is not a directory.")
    if s.eval_temperature is not None:
        if not (math.isfinite(s.eval_temperature) and s.eval_temperature > 0):
            raise TrainerInputError(f"--eval-temperature must be a finite number > 0 (the greedy figure is always "
                                    f"reported), got {s.eval_temperature}.")
        if not s.eval_cache_dir:
            raise TrainerInputError("--eval-temperature needs --eval-cache-dir (the held-out cache to evaluate on).")
    _check_positive("eval_top_k", s.eval_top_k)
    _check_positive("export_check_blocks", s.export_check_blocks)
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
    if s.loss_decay_gamma is not None and s.loss_decay_gamma < 0:
        raise TrainerInputError(f"loss_decay_gamma={s.loss_decay_gamma} must be >= 0 (0 = uniform weights).")
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


def training_arguments(s: DFlashTrainingSettings, *, anchors: int, block_size: int, resume: bool = False) -> Any:
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
        resume_if_possible=resume,  # only when build_trainer picked (and verified) a checkpoint
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

    from dflash_gptoss.draft_config import make_draft_config

    validate_settings(s)
    if s.lr_schedule not in _SCHEDULES:
        raise TrainerInputError(f"lr_schedule={s.lr_schedule!r}; choose one of {sorted(_SCHEDULES)}.")
    from dflash_gptoss.teacher_snapshot import SnapshotError, check_tokenizer, validate_snapshot

    try:  # config.json, the weights' headers, tokenizer.json: a damaged snapshot is named, not blamed on the cache
        validate_snapshot(s.teacher_snapshot_dir, tokenizer=False)
        if (Path(s.teacher_snapshot_dir) / "tokenizer.json").exists():  # needed only for the MASK default, but a
            check_tokenizer(s.teacher_snapshot_dir)  # damaged one is named whenever it is there
    except SnapshotError as e:
        raise TrainerInputError(f"--teacher-snapshot-dir: {e}") from e
    teacher_cfg = AutoConfig.from_pretrained(s.teacher_snapshot_dir)
    vocab = int(teacher_cfg.vocab_size)
    if vocab % s.tp:
        raise TrainerInputError(
            f"vocab_size={vocab} is not divisible by tp={s.tp}: lm_head rows are sharded over tp; "
            f"pick a tp that divides {vocab}.")
    if s.export_dir:
        from dflash_gptoss.export_draft import check_export_dir

        check_export_dir(s.export_dir)
    ds = DFlashCacheDataset(s.cache_dir, seed=s.seed, bf16_as_bits=True, verify=s.verify_cache)
    meta = ds.meta
    ds.validate(teacher_config=teacher_cfg)
    ds.check_teacher(s.teacher_snapshot_dir)
    block_size = int(s.block_size or meta["block_size"])
    rows = s.total_batch_size * s.gradient_accumulation_steps
    if rows > ds.num_items:
        raise TrainerInputError(f"one step needs {rows} cache rows but {s.cache_dir} holds {ds.num_items}.")
    mask_id = s.mask_token_id if s.mask_token_id is not None else _default_mask_token_id(s.teacher_snapshot_dir, vocab)
    draft_config = make_draft_config(teacher_cfg, num_hidden_layers=s.num_draft_layers, block_size=block_size,
                                     mask_token_id=mask_id, layer_ids=list(meta["target_layer_ids"]))
    ds.validate(draft_config=draft_config)  # block size / layer ids / hidden size vs the cache
    gamma = resolve_loss_decay_gamma(s.loss_decay_gamma, block_size)
    held_out = _held_out(s, ds, block_size)
    lock, resume_from = _claim_run_folder(s, draft_config, ds, gamma)
    try:
        return _assemble(s, ds, teacher_cfg, draft_config, block_size, mask_id, gamma, resume_from, lock, held_out)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def sampled_accept_text(entry: dict[str, Any]) -> str:
    """``3.412`` or ``3.412-3.415`` (the bounds when some proposals fell outside the teacher's top k)."""
    lo, hi = entry["eval_expected_accept_len_lower"], entry["eval_expected_accept_len_upper"]
    return f"{lo:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}-{hi:.3f}"


def _held_out(s: DFlashTrainingSettings, ds: DFlashCacheDataset, block_size: int) -> tuple[Any, Any, Any]:
    """(eval cache, its fixed eval set, the teacher's top-k at ``--eval-temperature``) when ``--eval-cache-dir``
    is given, else Nones."""
    if not s.eval_cache_dir:
        return None, None, None
    from dflash_gptoss.train_heldout_eval import EvalCacheError, build_eval_set, check_eval_cache, check_held_out

    eval_ds = DFlashCacheDataset(s.eval_cache_dir, seed=s.seed, bf16_as_bits=True, verify=s.verify_cache)
    check_eval_cache(ds.meta, eval_ds.meta, s.eval_cache_dir)
    check_held_out(ds, eval_ds, s.eval_cache_dir)
    if s.eval_temperature is not None and eval_ds.layout != "windows":
        raise EvalCacheError(f"--eval-temperature needs a 'windows'-layout eval cache (its token ids give the teacher "
                             f"its input), but {s.eval_cache_dir} is {eval_ds.layout!r}; build the held-out cache "
                             "with --layout windows.")
    eval_set = build_eval_set(eval_ds, block_size=block_size, anchors_per_item=s.anchors_per_window,
                              rows_per_batch=s.total_batch_size)
    return eval_ds, eval_set, _teacher_top_k(s, eval_ds)


def _teacher_top_k(s: DFlashTrainingSettings, eval_ds: DFlashCacheDataset) -> Any:
    """The teacher's top-k at ``--eval-temperature`` over the eval cache's windows, computed once before the draft
    exists (the teacher's parameters leave the devices again before training starts)."""
    if s.eval_temperature is None:
        return None
    import gc

    vocab = int(eval_ds.meta["teacher"]["vocab_size"])
    if s.eval_top_k > vocab:
        raise TrainerInputError(f"--eval-top-k {s.eval_top_k} is more than the teacher's {vocab} tokens.")

    from dflash_gptoss.teacher_jax import JaxTeacher
    from dflash_gptoss.train_heldout_eval import teacher_top_k

    _logger().info(f"--eval-temperature {s.eval_temperature:g}: the teacher's top-{s.eval_top_k} probabilities at "
                   f"every position of the {eval_ds.num_items} eval windows (once)")
    teacher = JaxTeacher(s.teacher_snapshot_dir, list(eval_ds.meta["target_layer_ids"]), dp=s.dp, tp=s.tp,
                         dtype=eval_ds.meta["build"]["dtype"])
    top = teacher_top_k(teacher, np.asarray(eval_ds.arrays["token_ids"]), s.eval_temperature, s.eval_top_k,
                        rows_per_call=s.dp)
    del teacher
    gc.collect()
    return top


def cache_identity(cache_dir: str | Path | None) -> dict[str, Any] | None:
    """What pins a run to its data: the cache folder and the sha256 of its manifest (which hashes every file)."""
    if not cache_dir:
        return None
    import hashlib

    from dflash_gptoss.run_safety.integrity import MANIFEST_NAME

    manifest = Path(cache_dir) / MANIFEST_NAME
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return {"dir": str(Path(cache_dir).absolute()), "manifest_sha256": digest}


def _claim_run_folder(s: DFlashTrainingSettings, draft_config: Any, ds: DFlashCacheDataset,
                      gamma: float) -> tuple[Any, Path | None]:
    """Lock ``save_directory/model_name`` for this job, pick (and verify) the checkpoint to resume, and
    record or compare the run's fixed settings (``checkpoints`` module doc)."""
    from dflash_gptoss.distributed import is_main_process
    from dflash_gptoss.run_safety.job_lock import acquire_for_job
    from dflash_gptoss.train_checkpoints import check_resume_matches, checkpoint_to_resume, run_record, write_run_record

    run_dir = Path(s.save_directory).absolute() / s.model_name
    existed = run_dir.exists()
    lock = acquire_for_job(run_dir, "draft training")
    try:
        resume_from = checkpoint_to_resume(run_dir, resume=s.resume, resume_if_possible=s.resume_if_possible)
        data = ds.meta["data"]
        record = run_record(draft_config, {
            "total_batch_size": s.total_batch_size, "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "anchors_per_window": s.anchors_per_window, "seed": s.seed, "loss_decay_gamma": gamma,
            "cache": {"layout": ds.layout, "ctx_len": ds.meta["ctx_len"], "num_windows": ds.num_items,
                      "tokens_sha256": data.get("tokens_sha256"),
                      "teacher_fingerprint": ds.meta["teacher"].get("weights_fingerprint")}})
        record["data"] = {"cache": cache_identity(s.cache_dir), "eval_cache": cache_identity(s.eval_cache_dir)}
        if resume_from is not None:
            check_resume_matches(resume_from, record, allow_new_cache=s.allow_new_cache)
        elif is_main_process():
            write_run_record(run_dir, record)
    except BaseException:
        if lock is not None:
            lock.release()
        if not existed and is_main_process():
            shutil.rmtree(run_dir, ignore_errors=True)  # only this run's lock file: leave no trace of a refused run
        raise
    return lock, resume_from


def _assemble(s: DFlashTrainingSettings, ds: DFlashCacheDataset, teacher_cfg: Any, draft_config: Any,
              block_size: int, mask_id: int, gamma: float, resume_from: Path | None,
              lock: Any, held_out: tuple[Any, Any, Any]) -> tuple[DFlashTrainer, Any]:
    """The expensive part of :func:`build_trainer`, once every input is known to be usable."""
    from dflash_gptoss.easydel_dflash_draft_model import create_draft_model

    meta, vocab = ds.meta, int(teacher_cfg.vocab_size)
    embed, lm_head = load_frozen_tables(s.teacher_snapshot_dir)
    if embed.shape != (vocab, int(teacher_cfg.hidden_size)) or lm_head.shape != embed.shape:
        raise CacheMismatchError(f"teacher tables {embed.shape}/{lm_head.shape} do not match its config.")
    model = create_draft_model(draft_config, dp=s.dp, tp=s.tp, seed=s.seed)
    if jax.process_count() > 1:
        _rng_keys_on_mesh(model)
        _single_writer_checkpoint_files()
    nb = anchors_per_row(ds.layout, int(meta["ctx_len"]), block_size, s.anchors_per_window)
    args = training_arguments(s, anchors=nb, block_size=block_size, resume=resume_from is not None)
    trainer = DFlashTrainer(args, model, dataset=ds, embed=embed, lm_head=lm_head, block_size=block_size,
                            mask_token_id=mask_id, loss_decay_gamma=gamma,
                            anchors_per_window=s.anchors_per_window, vocab_chunk_size=s.vocab_chunk_size,
                            seed=s.seed, resume_from=resume_from, eval_cache=held_out[0], eval_set=held_out[1],
                            eval_steps=s.eval_steps, keep_best=s.keep_best, eval_top=held_out[2])
    trainer.run_lock = lock
    if resume_from is not None:
        resumed = int(jax.device_get(trainer.model_state.step))
        if resumed != int(resume_from.name[4:]):
            raise TrainerInputError(f"--resume: easydel reloaded step {resumed}, not {resume_from} (see the warning "
                                    "above); refusing to silently start from elsewhere.")
    return trainer, draft_config


def latest_checkpoint(save_directory: str | Path, model_name: str) -> Path | None:
    """The ``run-<step>`` folder with the highest step under ``save_directory/model_name``, if any."""
    from dflash_gptoss.train_checkpoints import checkpoints

    found = checkpoints(Path(save_directory) / model_name)
    return found[-1] if found else None


def export_checkpoint(checkpoint_dir: str | Path, draft_config: Any, out_dir: str | Path, *,
                      dp: int | None = None, tp: int = 1, dtype: str = "float32") -> Path:
    """Any saved ``run-<step>`` -> a torch draft folder (``config.json`` + ``model.safetensors``).

    ``dp`` defaults to every device over ``tp`` (an easydel mesh must cover all visible devices).
    """
    from dflash_gptoss.easydel_dflash_draft_model import load_draft_state
    from dflash_gptoss.export_draft import export_nnx_draft
    from dflash_gptoss.train_checkpoints import require_good

    dp = jax.device_count() // tp if dp is None else dp
    state = load_draft_state(require_good(Path(checkpoint_dir)), dp=dp, tp=tp)
    return export_nnx_draft(state.model, draft_config, out_dir, dtype=dtype)


def run_training(s: DFlashTrainingSettings, built: tuple[DFlashTrainer, Any] | None = None) -> dict[str, Any]:
    """Build (unless ``built`` by :func:`build_trainer`), train with easydel's loop, export; a summary dict.

    ``export_dir`` set: the final state's draft is written as a torch folder the benchmark loads.
    Past one process every process takes part in gathering the weights and process 0 writes. The run
    folder's lock is released when this returns.
    """
    trainer, draft_config = built if built is not None else build_trainer(s)
    try:
        return _train_and_export(s, trainer, draft_config)
    finally:
        if getattr(trainer, "run_lock", None) is not None:
            trainer.run_lock.release()
            trainer.run_lock = None


def _train_and_export(s: DFlashTrainingSettings, trainer: DFlashTrainer, draft_config: Any) -> dict[str, Any]:
    from dflash_gptoss.export_after_training import export_checked

    start_step = int(jax.device_get(trainer.model_state.step))
    output = trainer.train()
    state = getattr(output, "state", None) or trainer.model_state
    summary: dict[str, Any] = {
        "start_step": start_step,
        "final_step": int(jax.device_get(state.step)),
        "history": trainer.history,
        "eval_history": trainer.eval_history,
        "best_eval_step": trainer.best[0] if trainer.best is not None else None,
        "checkpoint": str(latest_checkpoint(s.save_directory, s.model_name)),
    }
    if s.export_dir:
        summary.update(export_checked(trainer, draft_config, state, s.export_dir,
                                      teacher_snapshot_dir=s.teacher_snapshot_dir, max_blocks=s.export_check_blocks))
    return summary
