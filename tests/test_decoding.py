"""The speculative loop is lossless: token-identical to the KV-cache greedy baseline.

On the tiny teacher (sliding window 32) with generation longer than the window,
so every rollback crosses sliding-window layers, for three drafts: an untrained
DFlash draft, the oracle, and a draft that is right for a random prefix length.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

from dflash_gptoss.data_corpus import heldout_prompts
from dflash_gptoss.decoding import DFlashDrafter, OracleDrafter, greedy_decode, speculative_decode
from dflash_gptoss.draft_config import make_draft_config, target_layer_ids
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
from dflash_gptoss.teacher_torch import TargetRunner, load_target

NUM_PROMPTS = 20
PROMPT_TOKENS = 40
NEW_TOKENS = 72  # > sliding window (32): rollbacks cross the window
BLOCK = 8


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir):
    torch.manual_seed(0)
    model = load_target(tiny_teacher_dir)
    assert NEW_TOKENS > model.config.sliding_window
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    prompts = heldout_prompts(tokenizer, NUM_PROMPTS, PROMPT_TOKENS, seed=0)
    assert len(prompts) == NUM_PROMPTS
    baseline = TargetRunner(model, [])
    refs = [greedy_decode(baseline, p, NEW_TOKENS).tokens for p in prompts]
    layer_ids = target_layer_ids(model.config.num_hidden_layers, 3)
    runner = TargetRunner(model, layer_ids)
    return model, tokenizer, prompts, refs, runner, layer_ids


class PrefixOracle:
    """Right for a random number of slots per step, then deliberately wrong."""

    def __init__(self, reference: list[int], vocab: int, rng: np.random.Generator):
        self.reference, self.vocab, self.rng = reference, vocab, rng
        self.planned: list[int] = []

    def begin(self, features):
        pass

    def accept(self, features):
        pass

    def propose(self, anchor: int, position: int, num: int) -> list[int]:
        right = int(self.rng.integers(0, num + 1))
        self.planned.append(right)
        truth = self.reference[position + 1 : position + 1 + num]
        truth += [0] * (num - len(truth))
        return truth[:right] + [(t + 1) % self.vocab for t in truth[right:]]


def test_baseline_equals_generate(setup):
    model, tokenizer, prompts, refs, _, _ = setup
    for prompt, ref in list(zip(prompts, refs, strict=True))[:5]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.eos_token_id)
        assert out[0, len(prompt):].tolist() == ref


def _random_drafter(setup) -> DFlashDrafter:
    """An untrained one-layer DFlash draft (seed 1) on the tiny teacher."""
    model, tokenizer, _, _, _, layer_ids = setup
    torch.manual_seed(1)
    config = make_draft_config(model.config, num_hidden_layers=1, block_size=BLOCK,
                               mask_token_id=tokenizer.convert_tokens_to_ids("<|mask|>"), layer_ids=layer_ids)
    return DFlashDrafter(DFlashDraftModel(config).eval(), model)


def test_random_draft_is_lossless(setup):
    _, _, prompts, refs, runner, _ = setup
    drafter = _random_drafter(setup)
    for prompt, ref in zip(prompts, refs, strict=True):
        result = speculative_decode(runner, drafter, prompt, NEW_TOKENS, BLOCK)
        assert result.tokens == ref
        assert sum(result.accepted_lengths) + 1 >= NEW_TOKENS


def test_oracle_accepts_every_full_block(setup):
    _, _, prompts, refs, runner, _ = setup
    for prompt, ref in zip(prompts, refs, strict=True):
        result = speculative_decode(runner, OracleDrafter(prompt + ref), prompt, NEW_TOKENS, BLOCK)
        assert result.tokens == ref
        assert all(n == BLOCK for n in result.accepted_lengths[:-1])
        # prefill gives 1 token, each verify B: ceil((N-1)/B) verifies in all.
        assert result.target_forwards == 1 + -(-(NEW_TOKENS - 1) // BLOCK)


def test_partially_right_draft_is_lossless_and_accepts_exactly_its_right_prefix(setup):
    model, _, prompts, refs, runner, _ = setup
    rng = np.random.default_rng(0)
    for prompt, ref in zip(prompts, refs, strict=True):
        drafter = PrefixOracle(prompt + ref, model.config.vocab_size, rng)
        result = speculative_decode(runner, drafter, prompt, NEW_TOKENS, BLOCK)
        assert result.tokens == ref
        expected = [r + 1 for r in drafter.planned]
        assert result.accepted_lengths[: len(expected)] == expected
        assert result.accepted_lengths[len(expected) :] in ([], [1])  # a last 1-slot step needs no draft


def test_stop_token_ends_both_loops_at_the_same_place(setup):
    _, _, prompts, refs, runner, _ = setup
    prompt, ref = prompts[0], refs[0]
    stop = ref[10]  # a token the greedy output is known to contain: both loops stop right after its first use
    first = ref.index(stop)
    baseline = greedy_decode(TargetRunner(runner.model, []), prompt, NEW_TOKENS, eos_token_id=stop)
    spec = speculative_decode(runner, OracleDrafter(prompt + ref), prompt, NEW_TOKENS, BLOCK, eos_token_id=stop)
    assert baseline.tokens == spec.tokens == ref[: first + 1]


def test_config_built_cache_cannot_roll_back_past_the_window(tiny_teacher_dir, setup):
    """Why the loops build DynamicCache() themselves (docs/design.md, "GPT-OSS specifics"): the default can't crop."""
    model, _, prompts, _, _, _ = setup
    cache = DynamicCache(config=model.config)
    model(torch.tensor([prompts[0] + prompts[1]]), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError):
        cache.crop(len(prompts[0]))


def test_bad_requests_are_clear_errors(setup):
    _, _, prompts, refs, runner, _ = setup
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_decode(runner, prompts[0], 0)
    with pytest.raises(ValueError, match="block_size"):
        speculative_decode(runner, OracleDrafter(prompts[0] + refs[0]), prompts[0], 8, 1)
    with pytest.raises(ValueError, match="empty"):
        greedy_decode(runner, [], 8)


def test_sampling_runs_are_reproducible_and_temperature_zero_is_greedy(setup):
    from dflash_gptoss.decoding import Sampling, baseline_decode, new_generator

    model, _, prompts, refs, runner, _ = setup
    drafter = _random_drafter(setup)
    baseline = TargetRunner(model, [])
    cpu = torch.device("cpu")
    for sampling in (Sampling(1.0), Sampling(0.8, top_p=0.9, draft="sample")):
        runs = [speculative_decode(runner, drafter, prompts[0], 24, BLOCK, sampling=sampling,
                                   generator=new_generator(7, cpu)) for _ in range(2)]
        assert runs[0].tokens == runs[1].tokens and runs[0].accepted_lengths == runs[1].accepted_lengths
        assert len(runs[0].tokens) == 24 and len(runs[0].slot_accept_probs) == len(runs[0].accepted_lengths)
        base = [baseline_decode(baseline, prompts[0], 24, sampling=sampling, generator=new_generator(7, cpu))
                for _ in range(2)]
        assert base[0].tokens == base[1].tokens and len(base[0].tokens) == 24
    # Temperature 0 is the greedy loop itself: the same tokens as the reference, no sampling record.
    result = speculative_decode(runner, drafter, prompts[0], NEW_TOKENS, BLOCK, sampling=Sampling(0.0))
    assert result.tokens == refs[0] and result.slot_accept_probs == []
    assert baseline_decode(baseline, prompts[0], NEW_TOKENS, sampling=Sampling(0.0)).tokens == refs[0]


def test_bad_sampling_settings_are_clear_errors(setup):
    from dflash_gptoss.decoding import Sampling

    _, _, prompts, refs, runner, _ = setup
    for kwargs, message in [
        (dict(temperature=-1.0), "temperature must be a finite number >= 0, got -1.0"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(temperature=0.0, top_p=0.5), "top_p=0.5 needs a temperature > 0"),
        (dict(temperature=0.0, draft="sample"), "draft='sample' needs a temperature > 0"),
        (dict(temperature=1.0, draft="beam"), "draft must be 'greedy' or 'sample'"),
    ]:
        with pytest.raises(ValueError, match=message):
            Sampling(**kwargs)
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        speculative_decode(runner, OracleDrafter(prompts[0] + refs[0]), prompts[0], 8, BLOCK, sampling=Sampling(1.0))
    with pytest.raises(ValueError, match="OracleDrafter has none"):
        speculative_decode(runner, OracleDrafter(prompts[0] + refs[0]), prompts[0], 8, BLOCK,
                           sampling=Sampling(1.0, draft="sample"), generator=torch.Generator())
