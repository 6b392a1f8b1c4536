"""After training: choose the draft to export, export it beside ``--export-dir``, check it, then put it in place.

Invariant: ``--export-dir`` holds either what it held before, or a complete draft that passed the export
check (``export_check``); never a half-written folder, never an unchecked one. A draft that fails the
check is moved to ``<export-dir>.rejected`` (with its ``export_check.json``) for inspection.

Which draft: the final state, or with ``--keep-best`` the evaluation step with the best held-out mean
accepted length (``DFlashTrainer.best``). The check's blocks are the held-out ones when there is an
eval cache, else seeded blocks of the first training windows: the check compares two implementations
of one draft, so any real features serve, but held-out ones are what the benchmark will see.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any


def _params(graphstate: Any) -> dict[tuple[str, ...], Any]:
    """``{path: array}`` of a state's parameters, gathered to every process (a collective past one)."""
    from dflash_gptoss.distributed import gather_to_host
    from dflash_gptoss.easydel_dflash_draft_model import param_arrays

    return gather_to_host(param_arrays(graphstate))


def _check_blocks(trainer: Any, max_blocks: int) -> tuple[Any, Any, str]:
    """(eval set, its cache, a word for where the blocks come from) for the export check: the first
    ``max_blocks`` blocks of the held-out set, else of the first training windows."""
    from dflash_gptoss.train_heldout_eval import EvalSet, build_eval_set

    if trainer.eval_set is not None:
        es, cache, source = trainer.eval_set, trainer.eval_cache, "held-out"
    else:
        cache, source = trainer.cache, "training-cache"
        per_window = 1 if cache.layout == "blocks" else max(1, (int(cache.meta["ctx_len"]) - trainer.block_size) // 2)
        es = build_eval_set(cache, block_size=trainer.block_size, anchors_per_item=trainer.anchors_per_window,
                            rows_per_batch=int(trainer.arguments.total_batch_size),
                            max_rows=math.ceil(max_blocks / per_window) + 1)
    batches, blocks = [], 0
    for batch in es.batches:  # only the batches that hold the first max_blocks blocks
        if blocks >= max_blocks:
            break
        batches.append(batch)
        blocks += int((batch["anchor_weights"] > 0).sum())
    return EvalSet(batches, es.blocks[:max_blocks], []), cache, source


def export_checked(trainer: Any, draft_config: Any, state: Any, export_dir: str | os.PathLike, *,
                   teacher_snapshot_dir: str | os.PathLike, max_blocks: int) -> dict[str, Any]:
    """Export (best or final) parameters with the check; returns the summary's export fields."""
    from dflash_gptoss.distributed import is_main_process, is_multiprocess
    from dflash_gptoss.export_check import ExportCheckError, check_export
    from dflash_gptoss.export_draft import NonFiniteWeightsError, export_nnx_draft

    step, graphstate = trainer.best if trainer.best is not None else (int(state.step), state.graphstate)
    check_set, cache, source = _check_blocks(trainer, max_blocks)
    jax_loss, jax_correct = trainer.evaluator(check_set).correct(graphstate)
    if not math.isfinite(jax_loss):
        raise ExportCheckError(f"the trained JAX draft's loss on the {check_set.num_blocks} {source} check blocks is "
                               f"{jax_loss}: its outputs are not finite, so no accepted length can be checked; "
                               "nothing was exported.")
    jax_correct = jax_correct[: check_set.num_blocks]
    params = _params(graphstate)
    out = Path(export_dir).absolute()
    rejected = out.with_name(out.name + ".rejected")
    error, result = "", None

    def check(tmp: Path) -> None:  # runs on the complete folder before export_nnx_draft renames it into place
        nonlocal result
        try:
            result = check_export(tmp, teacher_snapshot_dir, cache, check_set.blocks, jax_correct, source=source)
        except ExportCheckError:
            shutil.rmtree(rejected, ignore_errors=True)
            shutil.copytree(tmp, rejected)
            raise

    if is_main_process():
        try:
            export_nnx_draft(params, draft_config, out, before_commit=check)
        except ExportCheckError as e:
            error = f"{e} The rejected draft and its export_check.json are kept in {rejected} for inspection."
        except NonFiniteWeightsError as e:  # refused before anything was written
            error = str(e)
    if is_multiprocess():
        from dflash_gptoss.distributed import broadcast_message

        error = broadcast_message(error)
    if error:
        raise ExportCheckError(error)
    return {"export_dir": str(out), "exported_step": int(step),
            "exported_from": "best held-out evaluation" if trainer.best is not None else "final state",
            "export_check": result}
