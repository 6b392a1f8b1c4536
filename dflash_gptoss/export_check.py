"""The export checks itself: the exported torch draft must accept what the trained JAX draft accepts.

Invariant: a folder reaches ``--export-dir`` only after the torch draft it holds, driven by the
benchmark's own drafter (``decoding.DFlashDrafter``: cached context K/V, blocks ``[anchor, MASK...]``,
the target's embedding and lm_head read from the teacher snapshot), proposed on the same held-out
blocks the JAX draft was scored on, gives the same teacher-forced accepted length (within
:data:`MAX_ACCEPT_GAP`) and per-slot accuracy (within :data:`MAX_SLOT_GAP`).

Why: every silent failure between training and serving (a one-slot shift between labels and
proposals, features of the wrong layer, a transposed weight, a RoPE setting lost on export) shows up
as a gap here, at export time, instead of as a draft accepted ~1 token per block on the GPU. The two
implementations agree to ~1e-5 in float32, so only argmax near-ties can differ: one flipped slot moves
the mean by at most (B-1)/blocks, 0.007 at 1024 blocks, below the 0.02 bound.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from dflash_gptoss.train_heldout_eval import EvalBlock, accept_lengths

CHECK_FILE = "export_check.json"
MAX_ACCEPT_GAP = 0.02
MAX_SLOT_GAP = 0.01


class ExportCheckError(RuntimeError):
    """The exported draft does not reproduce the trained one (the message names both figures)."""


def _tables_module(snapshot_dir: str | Path) -> Any:
    """The target's frozen embedding and lm_head as torch modules, read from the snapshot (no other weights)."""
    import torch
    from torch import nn

    from dflash_gptoss.train_batches import load_frozen_tables

    embed, lm_head = load_frozen_tables(snapshot_dir)

    class FrozenTables(nn.Module):
        """What ``DFlashDrafter`` reads from a target: ``get_input_embeddings()`` and ``lm_head``."""

        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding.from_pretrained(torch.from_numpy(embed), freeze=True)
            self.lm_head = nn.Linear(embed.shape[1], embed.shape[0], bias=False)
            self.lm_head.weight.data = torch.from_numpy(lm_head)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed_tokens

    return FrozenTables().eval()


def torch_correct(export_dir: str | Path, snapshot_dir: str | Path, cache: Any, blocks: list[EvalBlock]) -> np.ndarray:
    """Per-slot correctness ``[blocks, B-1]`` of the exported draft's proposals on ``blocks`` of ``cache``.

    Blocks of one window are proposed in anchor order through one ``DFlashDrafter``: each step feeds
    only the context accepted since the last block, exactly as the speculative loop does.
    """
    import torch

    from dflash_gptoss.bf16 import from_bf16_bits
    from dflash_gptoss.decoding import DFlashDrafter
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    draft = DFlashDraftModel.from_pretrained(export_dir).float().eval()
    tables = _tables_module(snapshot_dir)
    feature_name = "features" if cache.layout == "windows" else "context_features"
    by_row: dict[int, list[int]] = defaultdict(list)
    for i, b in enumerate(blocks):
        by_row[b.row].append(i)
    out = np.zeros((len(blocks), draft.block_size - 1), dtype=np.int8)
    for row, idx in by_row.items():
        feats = torch.from_numpy(from_bf16_bits(np.asarray(cache.arrays[feature_name][row]))[None])
        drafter, seen = DFlashDrafter(draft, tables), 0
        for i in sorted(idx, key=lambda i: blocks[i].anchor):
            b = blocks[i]
            new = feats[:, seen: b.anchor]
            if seen == 0:
                drafter.begin(new)
            else:
                drafter.accept(new)
            logits = drafter.propose_logits(int(b.target_ids[0]), b.anchor, draft.block_size - 1)
            if not bool(torch.isfinite(logits).all()):
                raise ExportCheckError(f"the exported torch draft's logits are not finite (NaN or Inf) on block "
                                       f"{i} (cache row {b.row}, anchor {b.anchor}); nothing was exported.")
            out[i] = logits.argmax(-1).numpy() == b.target_ids[1:]
            seen = b.anchor
    return out


def compare(jax_correct: np.ndarray, torch_correct: np.ndarray) -> dict[str, Any]:
    """``export_check.json``'s content: both drafts' figures on the same blocks, and whether they agree."""
    ja, ta = accept_lengths(jax_correct), accept_lengths(torch_correct)
    js, ts = jax_correct.mean(axis=0), torch_correct.mean(axis=0)
    gap, slot_gap = abs(float(ja.mean() - ta.mean())), float(np.abs(js - ts).max())
    return {
        "num_anchors": int(ja.size),
        "jax_accept_len_mean": float(ja.mean()),
        "torch_accept_len_mean": float(ta.mean()),
        "accept_len_gap": gap,
        "jax_slot_accuracy": [float(x) for x in js],
        "torch_slot_accuracy": [float(x) for x in ts],
        "max_slot_accuracy_gap": slot_gap,
        "blocks_that_differ": int((ja != ta).sum()),
        "tolerance": {"accept_len": MAX_ACCEPT_GAP, "slot_accuracy": MAX_SLOT_GAP},
        "passed": gap <= MAX_ACCEPT_GAP and slot_gap <= MAX_SLOT_GAP,
    }


def check_export(export_dir: str | Path, snapshot_dir: str | Path, cache: Any, blocks: list[EvalBlock],
                 jax_correct: np.ndarray, *, source: str) -> dict[str, Any]:
    """Run the torch side, write ``export_check.json`` into ``export_dir``, raise when the drafts disagree."""
    from dflash_gptoss.cache_format import write_json_atomic

    result = dict(compare(jax_correct, torch_correct(export_dir, snapshot_dir, cache, blocks)), blocks_from=source)
    write_json_atomic(Path(export_dir) / CHECK_FILE, result)
    if not result["passed"]:
        raise ExportCheckError(
            f"the exported torch draft does not reproduce the trained JAX draft on {result['num_anchors']} "
            f"{source} blocks: accepted length {result['torch_accept_len_mean']:.4f} (torch) vs "
            f"{result['jax_accept_len_mean']:.4f} (JAX), gap {result['accept_len_gap']:.4f} > {MAX_ACCEPT_GAP}; "
            f"largest per-slot accuracy gap {result['max_slot_accuracy_gap']:.4f} (limit {MAX_SLOT_GAP}). "
            "Nothing was exported.")
    return result

