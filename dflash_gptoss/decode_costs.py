"""What one step of each loop costs on a device: the figures behind a speedup.

A speculative step costs one draft forward plus one target verify of B tokens
and gains ``a`` tokens (the accepted length); a baseline step costs one
one-token target forward and gains one. So, at accepted length ``a``::

    speedup(a) ~= a * t_step(1) / (t_draft + t_verify(B))

``measure_costs`` times those three forwards at a given context length, and the
oracle run of the real loop gives the ceiling measured end to end.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from dflash_gptoss.decoding import DFlashDrafter
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
from dflash_gptoss.target import TargetRunner, new_target_cache


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure_costs(
    target_model: torch.nn.Module, draft: DFlashDraftModel, context_len: int, repeats: int = 10
) -> dict[str, Any]:
    """Seconds per target forward of 1 and of B tokens at ``context_len``, and per draft proposal."""
    device = target_model.lm_head.weight.device
    block = draft.block_size
    vocab = target_model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context_len), generator=gen).to(device)
    runner = TargetRunner(target_model, draft.target_layer_ids)
    try:
        cache = new_target_cache()
        prefill = runner(prompt, 0, cache)

        def step(width: int):
            def run():
                runner(prompt[:, :width], context_len, cache)
                cache.crop(context_len)

            return run

        # Steady state: the draft's cache holds the context; each step feeds the features of the
        # positions accepted last step (here a full block, the most it can be) and proposes.
        drafter = DFlashDrafter(draft, target_model)
        drafter.begin(prefill.features[:, : context_len - block])
        drafter.propose(int(prompt[0, -1]), context_len - block, block - 1)

        def propose():
            drafter.cache.crop(context_len - block)
            drafter.accept(prefill.features[:, context_len - block :])
            drafter.propose(int(prompt[0, -1]), context_len, block - 1)

        t_one = _timed(step(1), device, repeats)
        t_block = _timed(step(block), device, repeats)
        t_draft = _timed(propose, device, repeats)
    finally:
        runner.close()
    step_cost = t_draft + t_block
    return {
        "context_len": context_len,
        "block_size": block,
        "target_forward_1_token_s": t_one,
        "target_verify_block_s": t_block,
        "verify_over_one_token": t_block / t_one,
        "draft_propose_s": t_draft,
        "draft_over_one_token": t_draft / t_one,
        "modelled_speedup_by_accepted_length": {
            str(a): a * t_one / step_cost for a in range(1, block + 1)
        },
    }
