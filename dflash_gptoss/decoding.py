"""The two decode loops: the KV-cache greedy baseline and DFlash speculative decoding.

Both loops have the same structure (own cache from prefill on, explicit
positions, one argmax per target forward) so their wall-clock ratio is fair.
With greedy decoding the speculative loop must return exactly the baseline's
tokens; the verify rule below guarantees it as long as the block verify and the
one-token steps agree on the argmax (DESIGN.md: they are not bit-identical, so
the benchmark counts mismatches rather than assuming none).

Speculative step, with the target's cache holding positions ``< n`` and the
anchor ``x_n`` (the last emitted token, not yet in the cache):

1. the drafter proposes ``p_1..p_{v-1}`` for positions ``n+1..n+v-1``;
2. the target verifies ``[x_n, p_1, ..., p_{v-1}]`` in one forward;
   ``g_j = argmax`` at slot j is its greedy token for position ``n+j+1``;
3. accept the longest prefix with ``p_j == g_{j-1}`` (length a), emit
   ``p_1..p_a`` and the correction ``g_a``;
4. crop the target cache to ``n+a+1`` positions and hand the features of the
   accepted positions ``n..n+a`` to the drafter as new context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
from dflash_gptoss.target import TargetRunner, new_target_cache


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class DecodeResult:
    tokens: list[int]
    prefill_s: float
    decode_s: float
    target_forwards: int
    accepted_lengths: list[int] = field(default_factory=list)  # tokens gained per verify (1..B)


def _check_request(prompt_ids: list[int], max_new_tokens: int) -> None:
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty; the target needs at least one token to condition on.")


def _emit(out: list[int], new: list[int], max_new_tokens: int, eos_token_id: int | None) -> bool:
    """Append ``new`` to ``out`` up to the budget or an EOS; True when decoding is over."""
    for token in new:
        out.append(token)
        if len(out) >= max_new_tokens or token == eos_token_id:
            return True
    return False


@torch.inference_mode()
def greedy_decode(
    target: TargetRunner, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
) -> DecodeResult:
    """The baseline: prefill, then one target forward per token, argmax each time."""
    _check_request(prompt_ids, max_new_tokens)
    device = target.device
    cache = new_target_cache()
    prompt = torch.tensor([prompt_ids], device=device)
    t0 = _sync(device)
    token = int(target(prompt, 0, cache, last_only=True).logits[0, -1].argmax())
    t1 = _sync(device)
    out: list[int] = []
    done = _emit(out, [token], max_new_tokens, eos_token_id)
    forwards = 1
    step = torch.empty((1, 1), dtype=torch.long, device=device)
    while not done:
        step.fill_(token)
        token = int(target(step, len(prompt_ids) + len(out) - 1, cache).logits[0, -1].argmax())
        forwards += 1
        done = _emit(out, [token], max_new_tokens, eos_token_id)
    t2 = _sync(device)
    return DecodeResult(tokens=out, prefill_s=t1 - t0, decode_s=t2 - t1, target_forwards=forwards)


class Drafter(Protocol):
    """What the speculative loop needs from a draft."""

    def begin(self, features: torch.Tensor) -> None:
        """Context features [1, P, K*H] of the prompt positions ``0..P-1``."""

    def propose(self, anchor: int, position: int, num: int) -> list[int]:
        """``num`` proposals for positions ``position+1..position+num`` after ``anchor`` at ``position``."""

    def accept(self, features: torch.Tensor) -> None:
        """Features [1, a+1, K*H] of the positions just accepted (contiguous after the last context)."""


class DFlashDrafter:
    """A trained (or untrained) DFlash draft driving proposals, with its context K/V cached.

    Each call to ``propose`` feeds only the context positions accepted since the
    last call, appends their K/V (and the block's) to the draft cache, then crops
    the block's K/V back off: the cache always holds exactly positions ``< n``.
    """

    def __init__(self, draft: DFlashDraftModel, target_model: torch.nn.Module):
        self.draft = draft
        self.embed = target_model.get_input_embeddings()
        self.lm_head = target_model.lm_head
        self.mask_token_id = draft.mask_token_id
        self.cache = DynamicCache()
        self.pending: torch.Tensor | None = None

    def begin(self, features: torch.Tensor) -> None:
        self.cache = DynamicCache()
        self.pending = features

    def accept(self, features: torch.Tensor) -> None:
        self.pending = features

    @torch.inference_mode()
    def propose(self, anchor: int, position: int, num: int) -> list[int]:
        assert self.pending is not None, "begin() must be called before propose()"
        device = self.lm_head.weight.device
        block = torch.full((1, num + 1), self.mask_token_id, dtype=torch.long, device=device)
        block[0, 0] = anchor
        first_ctx = position - self.pending.shape[1]
        positions = torch.arange(first_ctx, position + num + 1, device=device)[None]
        hidden = self.draft(self.embed(block), self.pending.to(self.lm_head.weight.dtype), positions, self.cache)
        self.cache.crop(position)
        self.pending = None
        return self.lm_head(hidden[:, 1:]).argmax(-1)[0].tolist()


class OracleDrafter:
    """Proposes the target's own greedy continuation: every block but the last is fully accepted.

    ``reference`` is prompt + baseline output; the oracle measures the loop's
    ceiling (acceptance = block size) at the real verify cost.
    """

    def __init__(self, reference: list[int]):
        self.reference = list(reference)

    def begin(self, features: torch.Tensor) -> None:
        pass

    def accept(self, features: torch.Tensor) -> None:
        pass

    def propose(self, anchor: int, position: int, num: int) -> list[int]:
        tail = self.reference[position + 1 : position + 1 + num]
        return tail + [0] * (num - len(tail))


@torch.inference_mode()
def speculative_decode(
    target: TargetRunner,
    drafter: Drafter,
    prompt_ids: list[int],
    max_new_tokens: int,
    block_size: int,
    eos_token_id: int | None = None,
) -> DecodeResult:
    """DFlash speculative decoding, token-identical to ``greedy_decode`` (see module doc)."""
    _check_request(prompt_ids, max_new_tokens)
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (an anchor and at least one proposal), got {block_size}.")
    if not target.layer_ids:
        raise ValueError("the speculative loop needs a TargetRunner with the draft's target_layer_ids.")
    device = target.device
    cache = new_target_cache()
    t0 = _sync(device)
    first = target(torch.tensor([prompt_ids], device=device), 0, cache, last_only=True)
    anchor = int(first.logits[0, -1].argmax())
    drafter.begin(first.features)
    t1 = _sync(device)
    out: list[int] = []
    done = _emit(out, [anchor], max_new_tokens, eos_token_id)
    forwards, accepted = 1, []
    n = len(prompt_ids)  # position of the anchor
    while not done:
        size = min(block_size, max_new_tokens - len(out))  # a block of v slots yields at most v tokens
        proposals = drafter.propose(anchor, n, size - 1) if size > 1 else []
        block = torch.tensor([[anchor, *proposals]], device=device)
        verify = target(block, n, cache)
        forwards += 1
        greedy = verify.logits[0].argmax(-1).tolist()
        a = 0
        while a < size - 1 and proposals[a] == greedy[a]:
            a += 1
        accepted.append(a + 1)
        done = _emit(out, proposals[:a] + [greedy[a]], max_new_tokens, eos_token_id)
        cache.crop(n + a + 1)
        drafter.accept(verify.features[:, : a + 1])
        n, anchor = n + a + 1, greedy[a]
    t2 = _sync(device)
    return DecodeResult(out, prefill_s=t1 - t0, decode_s=t2 - t1, target_forwards=forwards, accepted_lengths=accepted)
