"""What one step of each loop costs on a device: the figures behind a speedup.

A speculative step costs one draft proposal plus one target verify of B tokens
and gains ``a`` tokens (the accepted length); a baseline step costs one
one-token target forward and gains one. So, at accepted length ``a``::

    speedup(a) ~= a * t_step(1) / (t_draft + t_verify(B))

``measure_costs`` times those three at a given context length. The benchmark
samples them in the same run as the two loops (a few rounds after every pass
over the prompts, pooled, so they see the same machine load as the loops) and
divides the measured speedup by this model's figure at the measured mean
accepted length: the loop efficiency,
how much of what the acceptance allows the loop delivers (the rest is host
overhead between forwards: argmax, cache crops, Python).

Each quantity is what its loop really pays: the one-token step runs with no
feature hooks on the target (the baseline captures nothing), the verify with the
draft's hooks (the speculative loop needs the features), and the proposal is the
real drafter's (a DFlash draft's forward, or the oracle's list lookup). The three
are timed in turn within each repeat, so a burst of load on a shared machine
falls on all three instead of on one of them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from dflash_gptoss.decoding import DFlashDrafter, Drafter, OracleDrafter
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
from dflash_gptoss.teacher_torch import TargetRunner, new_target_cache

WARMUP_ROUNDS = 2  # untimed rounds first: allocator growth and kernel selection happen there


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def measure_cost_samples(
    target_model: torch.nn.Module,
    draft: DFlashDraftModel | None,
    context_len: int,
    repeats: int = 10,
    *,
    block_size: int | None = None,
    layer_ids: list[int] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` rounds of: a one-token target step, a verify of B tokens, a proposal.

    ``draft=None`` times the oracle drafter (then ``block_size`` and ``layer_ids``
    say what the loop runs with); a draft brings its own block size and layer ids.
    """
    if draft is not None:
        block_size, layer_ids = draft.block_size, draft.target_layer_ids
    if block_size is None or not layer_ids:
        raise ValueError("measuring costs needs a draft, or block_size and layer_ids for the oracle.")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    limit = getattr(target_model.config, "max_position_embeddings", None)
    if context_len <= block_size or (limit is not None and context_len + block_size > limit):
        raise ValueError(f"context_len must be in ({block_size}, {limit}-{block_size}] so a block fits after it "
                         f"within the target's positions, got {context_len}.")
    device = target_model.lm_head.weight.device
    vocab = target_model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context_len), generator=gen).to(device)
    cache = new_target_cache()
    plain = TargetRunner(target_model, [])
    hooked = TargetRunner(target_model, layer_ids)
    try:
        prefill = hooked(prompt, 0, cache)  # the features of the context, for the drafter
    finally:
        hooked.close()

    def forward(runner: TargetRunner, width: int) -> Callable[[], None]:
        def run() -> None:  # a step at position context_len, then the cache back to the context
            runner(prompt[:, :width], context_len, cache)
            cache.crop(context_len)

        return run

    # Steady state: the drafter's cache holds the context but the last block; each proposal feeds
    # the features of a full accepted block (the most a step hands over) and proposes B-1 tokens.
    drafter: Drafter = (DFlashDrafter(draft, target_model) if draft is not None
                        else OracleDrafter(prompt[0].tolist() + prompt[0, :block_size].tolist()))
    head = context_len - block_size
    drafter.begin(prefill.features[:, :head])
    drafter.propose(int(prompt[0, head]), head, block_size - 1)

    def propose() -> None:
        if isinstance(drafter, DFlashDrafter):
            drafter.cache.crop(head)
        drafter.accept(prefill.features[:, head:])
        drafter.propose(int(prompt[0, -1]), context_len, block_size - 1)

    samples: dict[str, list[float]] = {"one": [], "verify": [], "draft": []}
    for round_index in range(WARMUP_ROUNDS + repeats):
        one = _seconds(forward(plain, 1), device)
        hooked = TargetRunner(target_model, layer_ids)  # hooks live only while the verify is timed
        try:
            verify = _seconds(forward(hooked, block_size), device)
        finally:
            hooked.close()
        draft_s = _seconds(propose, device)
        if round_index >= WARMUP_ROUNDS:
            samples["one"].append(one)
            samples["verify"].append(verify)
            samples["draft"].append(draft_s)
    return samples


def summarize_costs(samples: dict[str, list[float]], *, context_len: int, block_size: int,
                    drafter: str) -> dict[str, Any]:
    """Medians of the samples (possibly pooled from several calls) and the speedup they model."""
    t_one, t_block, t_draft = (statistics.median(samples[k]) for k in ("one", "verify", "draft"))
    step_cost = t_draft + t_block
    return {
        "context_len": context_len,
        "block_size": block_size,
        "repeats": len(samples["one"]),
        "drafter": drafter,
        "target_forward_1_token_s": t_one,
        "target_verify_block_s": t_block,
        "verify_over_one_token": t_block / t_one,
        "draft_propose_s": t_draft,
        "draft_over_one_token": t_draft / t_one,
        "modelled_speedup_by_accepted_length": {
            str(a): a * t_one / step_cost for a in range(1, block_size + 1)
        },
    }


def measure_costs(
    target_model: torch.nn.Module,
    draft: DFlashDraftModel | None,
    context_len: int,
    repeats: int = 10,
    *,
    block_size: int | None = None,
    layer_ids: list[int] | None = None,
) -> dict[str, Any]:
    """Median seconds of a one-token target step, a verify of B tokens and a draft proposal at ``context_len``."""
    samples = measure_cost_samples(target_model, draft, context_len, repeats, block_size=block_size,
                                   layer_ids=layer_ids)
    return summarize_costs(samples, context_len=context_len,
                           block_size=draft.block_size if draft is not None else block_size,
                           drafter="oracle" if draft is None else "dflash")


def modelled_speedup(costs: dict[str, Any], accepted_length: float) -> float:
    """``a * t_step / (t_verify + t_draft)``: the speedup an accepted length allows at these step costs."""
    return accepted_length * costs["target_forward_1_token_s"] / (
        costs["target_verify_block_s"] + costs["draft_propose_s"])
