"""The two decode loops: the KV-cache greedy baseline and DFlash speculative decoding.

Both loops have the same structure (own cache from prefill on, explicit
positions, one argmax per target forward) so their wall-clock ratio is fair.
With greedy decoding the speculative loop must return exactly the baseline's
tokens; the verify rule below guarantees it as long as the block verify and the
one-token steps agree on the argmax (docs/design.md, "GPT-OSS specifics": they are not bit-identical, so
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

Sampling (``temperature > 0``): lossless then means the output has exactly the
target's sampling distribution ``p`` (the logits after temperature and top-p),
not the baseline's tokens. Steps 1, 2 and 4 are unchanged; step 3 becomes the
speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023), slot by slot:
accept ``p_j`` with probability ``min(1, p(p_j) / q(p_j))``, where ``q`` is the
distribution the proposal was drawn from (one-hot for an argmax proposal); at
the first rejection emit a sample of the normalised residual ``max(p - q, 0)``
and stop; when every proposal is accepted, emit a bonus sample of the last
slot's ``p``. Each emitted token then has law ``p`` given what precedes it,
whatever ``q`` is. Every random draw comes from one ``torch.Generator``, so a
seeded run is reproducible; ``temperature == 0`` takes the greedy code above.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import DynamicCache

from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
from dflash_gptoss.teacher_torch import TargetRunner, new_target_cache


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
    # Sampling only: per verify, the acceptance probability min(1, p/q) of each slot the rule reached
    # (the accepted ones and the first rejected one).
    slot_accept_probs: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    """How the target's next token is chosen. ``temperature == 0``: argmax (greedy).

    ``temperature > 0``: a sample of ``softmax(logits / temperature)``, cut to the
    smallest set of most likely tokens whose mass reaches ``top_p`` and renormalised
    (``top_p`` None or 1.0: no cut). ``draft`` says how the drafter proposes at T > 0:
    ``greedy`` (its argmax; ``q`` one-hot) or ``sample`` (a draw from its own logits
    under the same temperature and top-p).
    """

    temperature: float = 0.0
    top_p: float | None = None
    draft: str = "greedy"

    def __post_init__(self) -> None:
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}.")
        if self.top_p is not None:
            if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}.")
            if t == 0:
                raise ValueError(f"top_p={self.top_p} needs a temperature > 0 (greedy decoding takes the argmax, "
                                 "which no top-p cut changes).")
        if self.draft not in ("greedy", "sample"):
            raise ValueError(f"draft must be 'greedy' or 'sample', got {self.draft!r}.")
        if self.draft == "sample" and t == 0:
            raise ValueError("draft='sample' needs a temperature > 0 (at temperature 0 the drafter proposes its "
                             "argmax).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def token_distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """``p`` over the last axis: softmax of ``logits / T`` in at least float32, cut to top-p and renormalised."""
    if sampling.greedy:
        raise ValueError("greedy decoding has no sampling distribution (temperature 0).")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(dtype) / sampling.temperature, dim=-1)
    if sampling.top_p is None or sampling.top_p >= 1.0:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True, stable=True)
    # Keep a token while the mass of the tokens before it is below top_p: the smallest set reaching top_p.
    keep = (ordered.cumsum(dim=-1) - ordered) < sampling.top_p
    cut = torch.zeros_like(probs).scatter(-1, order, ordered * keep)
    return cut / cut.sum(dim=-1, keepdim=True)


def acceptance_probabilities(p: torch.Tensor, q: torch.Tensor | None, proposals: torch.Tensor) -> torch.Tensor:
    """``min(1, p_j(x_j) / q_j(x_j))`` per slot; ``q`` None means one-hot proposals, so ``p_j(x_j)``.

    ``p`` [S, V] the target's distributions at the proposal slots, ``q`` [S, V] the
    distributions the proposals ``x`` [S] were drawn from.
    """
    p_x = p.gather(-1, proposals[:, None])[:, 0]
    if q is None:
        return p_x
    return torch.clamp(p_x / q.gather(-1, proposals[:, None])[:, 0], max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor | None, proposal: int) -> torch.Tensor:
    """The law of the token emitted after rejecting ``proposal``: normalised ``max(p - q, 0)``.

    A rejection has positive probability only where ``q(x) > p(x)`` somewhere, so
    the residual has positive mass whenever it is used; where rounding leaves it
    none, ``p`` itself is returned.
    """
    if q is None:
        q = torch.zeros_like(p)
        q[proposal] = 1.0
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return residual / total if total > 0 else p


@dataclass(frozen=True)
class VerifyRule:
    """The two probabilities a verify step draws from (tests swap in a wrong rule to show it is caught)."""

    accept: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
    residual: Callable[[torch.Tensor, torch.Tensor | None, int], torch.Tensor]


SPECULATIVE_SAMPLING = VerifyRule(accept=acceptance_probabilities, residual=residual_distribution)


def sample_token(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def verify_sampled(
    p: torch.Tensor,
    proposals: list[int],
    q: torch.Tensor | None,
    generator: torch.Generator,
    rule: VerifyRule = SPECULATIVE_SAMPLING,
) -> tuple[int, int, list[float]]:
    """One verify step at T > 0: (accepted count a, the token emitted after them, slot acceptance probabilities).

    ``p`` [len(proposals) + 1, V]: the target's distribution at every slot of the
    verified block (slot j is for the position of proposal j + 1; the last slot is
    the bonus). ``q`` [len(proposals), V] or None (argmax proposals).
    """
    if proposals:
        x = torch.tensor(proposals, device=p.device)
        accept = rule.accept(p[:-1], q, x).tolist()
        uniforms = torch.rand(len(proposals), generator=generator, device=p.device, dtype=torch.float64).tolist()
        for j, (u, prob) in enumerate(zip(uniforms, accept, strict=True)):
            if u >= prob:
                residual = rule.residual(p[j], None if q is None else q[j], proposals[j])
                return j, sample_token(residual, generator), accept[: j + 1]
        return len(proposals), sample_token(p[-1], generator), accept
    return 0, sample_token(p[-1], generator), []


def new_generator(seed: int, device: torch.device) -> torch.Generator:
    """The one source of randomness of a sampling run, on the device its probabilities live on."""
    return torch.Generator(device=device).manual_seed(seed)


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


def _check_sampling(sampling: Sampling, generator: torch.Generator | None) -> None:
    if not sampling.greedy and generator is None:
        raise ValueError(f"sampling at temperature {sampling.temperature} needs a torch.Generator (new_generator(seed, "
                         "device)), so that the run is reproducible.")


def _next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The argmax at T=0; a draw of ``p`` from ``generator`` at T > 0."""
    if sampling.greedy:
        return int(logits.argmax())
    return sample_token(token_distribution(logits, sampling), generator)


@torch.inference_mode()
def baseline_decode(
    target: TargetRunner,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_id: int | None = None,
    *,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """The baseline: prefill, then one target forward per token; each token the argmax (T=0) or a draw of ``p``."""
    _check_request(prompt_ids, max_new_tokens)
    _check_sampling(sampling, generator)
    device = target.device
    cache = new_target_cache()
    prompt = torch.tensor([prompt_ids], device=device)
    t0 = _sync(device)
    token = _next_token(target(prompt, 0, cache, last_only=True).logits[0, -1], sampling, generator)
    t1 = _sync(device)
    out: list[int] = []
    done = _emit(out, [token], max_new_tokens, eos_token_id)
    forwards = 1
    step = torch.empty((1, 1), dtype=torch.long, device=device)
    while not done:
        step.fill_(token)
        logits = target(step, len(prompt_ids) + len(out) - 1, cache).logits[0, -1]
        token = _next_token(logits, sampling, generator)
        forwards += 1
        done = _emit(out, [token], max_new_tokens, eos_token_id)
    t2 = _sync(device)
    return DecodeResult(tokens=out, prefill_s=t1 - t0, decode_s=t2 - t1, target_forwards=forwards)


def greedy_decode(
    target: TargetRunner, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None
) -> DecodeResult:
    """The KV-cache greedy baseline (``baseline_decode`` at temperature 0)."""
    return baseline_decode(target, prompt_ids, max_new_tokens, eos_token_id)


class Drafter(Protocol):
    """What the speculative loop needs from a draft."""

    def begin(self, features: torch.Tensor) -> None:
        """Context features [1, P, K*H] of the prompt positions ``0..P-1``."""

    def propose(self, anchor: int, position: int, num: int) -> list[int]:
        """``num`` proposals for positions ``position+1..position+num`` after ``anchor`` at ``position``."""

    def accept(self, features: torch.Tensor) -> None:
        """Features [1, a+1, K*H] of the positions just accepted (contiguous after the last context)."""


class SamplingDrafter(Drafter, Protocol):
    """A drafter with a distribution of its own, which ``draft='sample'`` draws proposals from."""

    def propose_logits(self, anchor: int, position: int, num: int) -> torch.Tensor:
        """Logits [num, V] for positions ``position+1..position+num``; ``propose`` is their argmax."""


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

    def propose(self, anchor: int, position: int, num: int) -> list[int]:
        return self.propose_logits(anchor, position, num).argmax(-1).tolist()

    @torch.inference_mode()
    def propose_logits(self, anchor: int, position: int, num: int) -> torch.Tensor:
        assert self.pending is not None, "begin() must be called before propose()"
        device = self.lm_head.weight.device
        block = torch.full((1, num + 1), self.mask_token_id, dtype=torch.long, device=device)
        block[0, 0] = anchor
        first_ctx = position - self.pending.shape[1]
        positions = torch.arange(first_ctx, position + num + 1, device=device)[None]
        hidden = self.draft(self.embed(block), self.pending.to(self.lm_head.weight.dtype), positions, self.cache)
        self.cache.crop(position)
        self.pending = None
        return self.lm_head(hidden[:, 1:])[0]


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


def _draft_sampled(
    drafter: Drafter, anchor: int, position: int, num: int, sampling: Sampling, generator: torch.Generator
) -> tuple[list[int], torch.Tensor | None]:
    """Proposals at T > 0 and the law they were drawn from (None: the drafter's argmax, a one-hot ``q``)."""
    if num == 0:
        return [], None
    if sampling.draft == "greedy":
        return drafter.propose(anchor, position, num), None
    q = token_distribution(drafter.propose_logits(anchor, position, num), sampling)  # type: ignore[attr-defined]
    return torch.multinomial(q, 1, generator=generator)[:, 0].tolist(), q


@torch.inference_mode()
def speculative_decode(
    target: TargetRunner,
    drafter: Drafter,
    prompt_ids: list[int],
    max_new_tokens: int,
    block_size: int,
    eos_token_id: int | None = None,
    *,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    rule: VerifyRule = SPECULATIVE_SAMPLING,
) -> DecodeResult:
    """DFlash speculative decoding: token-identical to ``greedy_decode`` at T=0, ``p``-exact in law at T > 0."""
    _check_request(prompt_ids, max_new_tokens)
    _check_sampling(sampling, generator)
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (an anchor and at least one proposal), got {block_size}.")
    if not target.layer_ids:
        raise ValueError("the speculative loop needs a TargetRunner with the draft's target_layer_ids.")
    if sampling.draft == "sample" and not hasattr(drafter, "propose_logits"):
        raise ValueError(f"draft='sample' needs a drafter with a distribution; {type(drafter).__name__} has none.")
    device = target.device
    cache = new_target_cache()
    t0 = _sync(device)
    first = target(torch.tensor([prompt_ids], device=device), 0, cache, last_only=True)
    anchor = _next_token(first.logits[0, -1], sampling, generator)
    drafter.begin(first.features)
    t1 = _sync(device)
    out: list[int] = []
    done = _emit(out, [anchor], max_new_tokens, eos_token_id)
    forwards, accepted, slot_probs = 1, [], []
    n = len(prompt_ids)  # position of the anchor
    while not done:
        size = min(block_size, max_new_tokens - len(out))  # a block of v slots yields at most v tokens
        if sampling.greedy:
            proposals = drafter.propose(anchor, n, size - 1) if size > 1 else []
            verify = target(torch.tensor([[anchor, *proposals]], device=device), n, cache)
            greedy = verify.logits[0].argmax(-1).tolist()
            a = 0
            while a < size - 1 and proposals[a] == greedy[a]:
                a += 1
            token = greedy[a]
        else:
            proposals, q = _draft_sampled(drafter, anchor, n, size - 1, sampling, generator)
            verify = target(torch.tensor([[anchor, *proposals]], device=device), n, cache)
            a, token, probs = verify_sampled(token_distribution(verify.logits[0], sampling), proposals, q,
                                             generator, rule)
            slot_probs.append(probs)
        forwards += 1
        accepted.append(a + 1)
        done = _emit(out, proposals[:a] + [token], max_new_tokens, eos_token_id)
        cache.crop(n + a + 1)
        drafter.accept(verify.features[:, : a + 1])
        n, anchor = n + a + 1, token
    t2 = _sync(device)
    return DecodeResult(out, prefill_s=t1 - t0, decode_s=t2 - t1, target_forwards=forwards, accepted_lengths=accepted,
                        slot_accept_probs=slot_probs)
