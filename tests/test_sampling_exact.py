"""Speculative sampling is lossless in distribution: the exact law of its output equals the target's.

A random tiny GPT-OSS target (vocabulary 8, 5 layers, a sliding window of 2 so the
sliding layers matter within a few tokens) and a real DFlash draft with random weights,
both in float64. For every output sequence of ``N`` new tokens the probability that
the speculative loop emits it is computed exactly, by walking every branch the loop can
take (the prefill sample, each slot's accept or reject, the residual or bonus sample)
with the loop's own rule functions (``decoding.SPECULATIVE_SAMPLING``: acceptance
probabilities and residuals), the target's ``p`` and the drafter's ``q``. It must equal
the probability of plain autoregressive sampling, the product of ``p`` along the sequence.

Why 1e-9: both sides are sums of at most a few hundred products of ~10 float64 factors,
and every ``p`` and ``q`` is computed once and shared, so the two laws can differ only
by float64 rounding (~1e-15 relative per operation). A wrong rule moves probabilities
by ~1e-2 (the negative controls below measure it), seven orders of magnitude above.

The tree is marginalised at ``N`` tokens: a branch that has emitted ``N`` tokens is
recorded, whatever the rest of its block would have emitted. With a budget of exactly
``N`` new tokens that is the loop's law itself (its last blocks shrink to the tokens
still owed); with a larger budget the blocks stay full-sized (blocks of 8 with 4 new
tokens), which is the law of the first ``N`` tokens of a longer run.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from dflash_gptoss.decoding import (
    SPECULATIVE_SAMPLING,
    DFlashDrafter,
    Sampling,
    VerifyRule,
    acceptance_probabilities,
    residual_distribution,
    token_distribution,
)
from dflash_gptoss.draft_config import make_draft_config, target_layer_ids
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
from dflash_gptoss.teacher_torch import TargetRunner, new_target_cache
from dflash_gptoss.tiny_teacher import tiny_gptoss_config

VOCAB = 8
NEW_TOKENS = 4
PROMPT = [1, 5, 2]
MASK = VOCAB - 1
TOLERANCE = 1e-9


class ExactModels:
    """``p`` of every prefix and ``q`` of every draft block, each computed once (float64)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        from transformers import GptOssForCausalLM

        config = tiny_gptoss_config(VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=5,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=2)
        model = GptOssForCausalLM._from_config(config, attn_implementation="eager", experts_implementation="eager")
        model = model.double().eval().requires_grad_(False)
        with torch.no_grad():
            model.lm_head.weight.mul_(12.0)  # random init gives near-uniform logits; these are peaked and varied
        self.model = model
        self.layer_ids = target_layer_ids(config.num_hidden_layers, 2)
        self.runner = TargetRunner(model, self.layer_ids)
        self.drafts: dict[int, DFlashDraftModel] = {}
        self._logits: dict[tuple, torch.Tensor] = {}
        self._features: dict[tuple, torch.Tensor] = {}
        self._q: dict[tuple, torch.Tensor] = {}

    def _forward(self, seq: tuple) -> None:
        out = self.runner(torch.tensor([list(seq)]), 0, new_target_cache())
        for i in range(1, len(seq) + 1):  # causal: position i-1 sees only seq[:i]
            self._logits.setdefault(seq[:i], out.logits[0, i - 1])
            self._features.setdefault(seq[:i], out.features[:, :i])

    def logits(self, seq: tuple) -> torch.Tensor:
        if seq not in self._logits:
            self._forward(seq)
        return self._logits[seq]

    def features(self, seq: tuple) -> torch.Tensor:
        if seq not in self._features:
            self._forward(seq)
        return self._features[seq]

    def draft(self, block: int) -> DFlashDraftModel:
        if block not in self.drafts:
            torch.manual_seed(100 + block)
            config = make_draft_config(self.model.config, num_hidden_layers=1, block_size=block, mask_token_id=MASK,
                                       layer_ids=self.layer_ids)
            self.drafts[block] = DFlashDraftModel(config).double().eval()
        return self.drafts[block]

    def draft_logits(self, context: tuple, anchor: int, num: int, block: int) -> torch.Tensor:
        """The drafter's logits [num, V] for the block after ``anchor``, given the context positions before it."""
        key = (context, anchor, num, block)
        if key not in self._q:
            drafter = DFlashDrafter(self.draft(block), self.model)
            drafter.begin(self.features(context))
            self._q[key] = drafter.propose_logits(anchor, len(context), num)
        return self._q[key]


@pytest.fixture(scope="module")
def models() -> ExactModels:
    return ExactModels()


def autoregressive_law(models: ExactModels, sampling: Sampling) -> dict[tuple, float]:
    law = {}
    for seq in itertools.product(range(VOCAB), repeat=NEW_TOKENS):
        prob = 1.0
        for i, token in enumerate(seq):
            prob *= float(token_distribution(models.logits(tuple(PROMPT) + seq[:i]), sampling)[token])
        law[seq] = prob
    return law


def speculative_law(models: ExactModels, sampling: Sampling, block: int, budget: int,
                    rule: VerifyRule = SPECULATIVE_SAMPLING) -> dict[tuple, float]:
    """The exact law of the first NEW_TOKENS tokens the speculative loop emits (see module doc)."""
    law: dict[tuple, float] = defaultdict(float)
    prompt = tuple(PROMPT)

    def p_of(out: tuple) -> torch.Tensor:
        return token_distribution(models.logits(prompt + out), sampling)

    def start_block(out: tuple, prob: float) -> None:
        if len(out) >= NEW_TOKENS:
            law[out[:NEW_TOKENS]] += prob
            return
        size = min(block, budget - len(out))  # the loop's rule for the size of its next block
        logits = models.draft_logits(prompt + out[:-1], out[-1], size - 1, block) if size > 1 else None
        slot(out, prob, 0, size, logits)

    def slot(out: tuple, prob: float, j: int, size: int, logits: torch.Tensor | None) -> None:
        if len(out) >= NEW_TOKENS:
            law[out[:NEW_TOKENS]] += prob
            return
        p = p_of(out)
        if j == size - 1:  # every proposal accepted: the bonus token, then a new block
            for y in range(VOCAB):
                start_block(out + (y,), prob * float(p[y]))
            return
        if sampling.draft == "greedy":  # the argmax proposal; q one-hot
            q, candidates = None, [(int(logits[j].argmax()), 1.0)]
        else:
            q = token_distribution(logits[j], sampling)
            candidates = [(x, float(q[x])) for x in range(VOCAB) if q[x] > 0]
        xs = torch.tensor([x for x, _ in candidates])
        accept = rule.accept(p.expand(len(xs), -1), None if q is None else q.expand(len(xs), -1), xs).tolist()
        for (x, weight), a in zip(candidates, accept, strict=True):
            if a > 0:
                slot(out + (x,), prob * weight * a, j + 1, size, logits)
            if a < 1:
                residual = rule.residual(p, q, x)
                for y in range(VOCAB):
                    if residual[y] > 0:
                        start_block(out + (y,), prob * weight * (1 - a) * float(residual[y]))

    first = p_of(())
    for y in range(VOCAB):  # the prefill's token
        start_block((y,), float(first[y]))
    return dict(law)


def largest_difference(spec: dict[tuple, float], ar: dict[tuple, float]) -> float:
    return max(abs(spec.get(seq, 0.0) - prob) for seq, prob in ar.items())


SETTINGS = [
    pytest.param(Sampling(1.0, draft="sample"), id="T1-sample"),
    pytest.param(Sampling(1.0, draft="greedy"), id="T1-greedy"),
    pytest.param(Sampling(0.7, top_p=0.8, draft="sample"), id="T0.7-topp0.8-sample"),
]


@pytest.mark.parametrize("sampling", SETTINGS)
@pytest.mark.parametrize("block", [2, 4, 8])
def test_speculative_law_equals_autoregressive_law(models, sampling, block):
    ar = autoregressive_law(models, sampling)
    assert sum(ar.values()) == pytest.approx(1.0, abs=TOLERANCE)
    # The draft's q differs from p everywhere (random weights), so every branch kind is taken.
    for budget in (NEW_TOKENS, NEW_TOKENS + block):
        spec = speculative_law(models, sampling, block, budget)
        assert set(spec) <= set(ar)
        assert sum(spec.values()) == pytest.approx(1.0, abs=TOLERANCE)
        diff = largest_difference(spec, ar)
        print(f"block {block} budget {budget} {sampling}: largest |P_spec - P_ar| = {diff:.3e}")
        assert diff <= TOLERANCE


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    # top_p values away from the cumulative sums (0.5, 0.8, 0.95), where float rounding would decide.
    cut = token_distribution(logits, Sampling(1.0, top_p=0.75))  # 0.5 + 0.3 reaches 0.75: two tokens kept
    assert cut.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0], abs=1e-15)
    cut = token_distribution(logits, Sampling(1.0, top_p=0.85))  # needs the third
    assert cut.tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], abs=1e-15)
    # Temperature 2 is softmax(log p / 2): proportional to sqrt(p).
    hot = token_distribution(logits, Sampling(2.0))
    root = torch.sqrt(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    assert hot.tolist() == pytest.approx((root / root.sum()).tolist(), abs=1e-15)


def _always_accept(p, q, proposals):
    return torch.ones(len(proposals), dtype=p.dtype)


def _correction_from_p(p, q, proposal):
    return p


WRONG_RULES = {
    "always accept": VerifyRule(accept=_always_accept, residual=residual_distribution),
    "correction drawn from p, not the residual": VerifyRule(accept=acceptance_probabilities,
                                                            residual=_correction_from_p),
}


@pytest.mark.parametrize("name", list(WRONG_RULES))
def test_a_wrong_rule_is_caught(models, name):
    """Negative controls: each wrong rule moves some sequence's probability far past the tolerance."""
    sampling = Sampling(1.0, draft="sample")
    ar = autoregressive_law(models, sampling)
    spec = speculative_law(models, sampling, 4, NEW_TOKENS + 4, WRONG_RULES[name])
    diff = largest_difference(spec, ar)
    print(f"{name}: largest |P_spec - P_ar| = {diff:.3e}")
    assert diff > 1e-4
