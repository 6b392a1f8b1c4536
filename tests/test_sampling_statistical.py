"""Speculative sampling on the tiny teacher draws from the target's law: a chi-square test on 20,000 samples.

``test_sampling_exact.py`` proves the rule exact on a small random target; this test runs
the real loops end to end on the tiny teacher (vocabulary 4096, sliding-window layers,
the cache crop and the feature hand-off) and compares what they emit. Each loop is run
20,000 times at temperature 1 with 3 new tokens, each run seeded by its own index
(disjoint seed ranges per loop, so the two samples are independent), and the 2-token
continuation after the prefill's token, ``(y2, y3)``, is counted. With 3 new tokens the
speculative loop verifies one proposal: ``y2`` is an accepted proposal or the residual's
sample, ``y3`` the bonus of the same verify or the first token of the next block, after
the cache was cropped. The draft is a real DFlash draft with random weights, sampling
its proposals (``draft='sample'``), so ``q`` is far from ``p`` and most proposals are
rejected: the residual carries the test.

The test: Pearson's chi-square test of homogeneity on the pair counts of the two samples,
with every pair seen fewer than ``2 * MIN_EXPECTED`` times in both samples together pooled
into one cell (so each kept cell expects at least ``MIN_EXPECTED`` in each sample, where
the chi-square approximation holds). If both loops draw from the same law, the statistic
exceeds the chi-square quantile ``isf(FALSE_FAILURE, df)`` with probability
``FALSE_FAILURE = 1e-6``. The seeds are fixed, so the test is deterministic on a machine;
on another machine (other float32 reduction order) it draws other samples, and fails
falsely with that probability. A wrong rule (always accept) must exceed the threshold on
5,000 samples against the first 5,000 of the baseline (the same test, a quarter of the data).

The 45,000 loop runs (~7 ms each on an idle core) take ~5 minutes of CPU; two worker
processes share them.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

SAMPLES = 20_000
CONTROL_SAMPLES = 5_000  # a wrong rule must fail even on a quarter of the samples (vs the first 5,000 baseline ones)
NEW_TOKENS = 3
BLOCK = 8
TEMPERATURE = 1.0
FALSE_FAILURE = 1e-6
MIN_EXPECTED = 10
CHUNK = 2_500
SEED_BASE = {"baseline": 0, "speculative": 1_000_000, "always-accept": 2_000_000}


def _always_accept(p, q, proposals):
    import torch

    return torch.ones(len(proposals), dtype=p.dtype)


def _continuations(snapshot: str, loop: str, seeds: list[int]) -> list[tuple[int, int]]:
    """Worker: ``(y2, y3)`` of one loop for each seed (runs in a fresh process)."""
    import torch

    from dflash_gptoss.data_corpus import heldout_prompts
    from dflash_gptoss.decoding import (
        SPECULATIVE_SAMPLING,
        DFlashDrafter,
        Sampling,
        VerifyRule,
        baseline_decode,
        new_generator,
        residual_distribution,
        speculative_decode,
    )
    from dflash_gptoss.draft_config import default_mask_token_id, make_draft_config, target_layer_ids
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
    from dflash_gptoss.teacher_torch import TargetRunner, load_target

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    model = load_target(snapshot)
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    [prompt] = heldout_prompts(tokenizer, 1, 16, seed=0)
    sampling = Sampling(TEMPERATURE, draft="sample")
    device = torch.device("cpu")
    out = []
    if loop == "baseline":
        runner = TargetRunner(model, [])
        for seed in seeds:
            tokens = baseline_decode(runner, prompt, NEW_TOKENS, sampling=sampling,
                                     generator=new_generator(seed, device)).tokens
            out.append((tokens[1], tokens[2]))
        return out
    layer_ids = target_layer_ids(model.config.num_hidden_layers, 3)
    torch.manual_seed(0)
    config = make_draft_config(model.config, num_hidden_layers=1, block_size=BLOCK,
                               mask_token_id=default_mask_token_id(model.config.vocab_size, tokenizer),
                               layer_ids=layer_ids)
    drafter = DFlashDrafter(DFlashDraftModel(config).eval(), model)
    runner = TargetRunner(model, layer_ids)
    rule = SPECULATIVE_SAMPLING if loop == "speculative" else VerifyRule(_always_accept, residual_distribution)
    for seed in seeds:
        tokens = speculative_decode(runner, drafter, prompt, NEW_TOKENS, BLOCK, sampling=sampling,
                                    generator=new_generator(seed, device), rule=rule).tokens
        out.append((tokens[1], tokens[2]))
    return out


def chi_square_homogeneity(a: Counter, b: Counter, min_expected: int = MIN_EXPECTED) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom for "a and b are samples of one law" (equal-size samples)."""
    n_a, n_b = sum(a.values()), sum(b.values())
    kept, other = [], [0, 0]
    for cell in set(a) | set(b):
        if a[cell] + b[cell] >= 2 * min_expected:
            kept.append([a[cell], b[cell]])
        else:
            other[0] += a[cell]
            other[1] += b[cell]
    if sum(other) >= 2 * min_expected:
        kept.append(other)
    elif kept:  # too small to stand alone: merge into the smallest kept cell
        smallest = min(kept, key=sum)
        smallest[0] += other[0]
        smallest[1] += other[1]
    stat = 0.0
    for count_a, count_b in kept:
        total = count_a + count_b
        for observed, n in ((count_a, n_a), (count_b, n_b)):
            expected = n * total / (n_a + n_b)
            stat += (observed - expected) ** 2 / expected
    return stat, len(kept) - 1


@pytest.fixture(scope="module")
def samples(tiny_teacher_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """Each loop's continuations in seed order."""
    size = {"baseline": SAMPLES, "speculative": SAMPLES, "always-accept": CONTROL_SAMPLES}
    jobs = [(loop, list(range(SEED_BASE[loop] + start, SEED_BASE[loop] + min(start + CHUNK, size[loop]))))
            for loop in SEED_BASE for start in range(0, size[loop], CHUNK)]
    pairs: dict[str, list[tuple[int, int]]] = {loop: [] for loop in SEED_BASE}
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(loop, pool.submit(_continuations, str(tiny_teacher_dir), loop, seeds)) for loop, seeds in jobs]
        for loop, future in futures:  # in submission order, so each list is in seed order
            pairs[loop] += future.result()
    assert {loop: len(p) for loop, p in pairs.items()} == size
    return pairs


def test_chi_square_arithmetic():
    same = Counter({"x": 50, "y": 50})
    assert chi_square_homogeneity(same, same) == (0.0, 1)
    # 2x2 table [[60, 40], [40, 60]]: expected 50 everywhere, statistic 4 * 10^2 / 50 = 8.
    assert chi_square_homogeneity(Counter({"x": 60, "y": 40}), Counter({"x": 40, "y": 60})) == (8.0, 1)
    # Rare cells are pooled: "r1" and "r2" (3 in all) join the smallest kept cell.
    stat, df = chi_square_homogeneity(Counter({"x": 60, "y": 40, "r1": 1}), Counter({"x": 40, "y": 60, "r2": 2}))
    assert df == 1


def test_speculative_sampling_matches_the_target_law(samples):
    from scipy.stats import chi2

    stat, df = chi_square_homogeneity(Counter(samples["baseline"]), Counter(samples["speculative"]))
    threshold = float(chi2.isf(FALSE_FAILURE, df))
    print(f"speculative vs baseline: chi-square {stat:.1f}, df {df}, threshold {threshold:.1f} "
          f"(false-failure probability {FALSE_FAILURE})")
    assert df >= 20  # enough distinct continuations for the test to say something
    assert stat <= threshold


def test_always_accepting_is_caught(samples):
    from scipy.stats import chi2

    stat, df = chi_square_homogeneity(Counter(samples["baseline"][:CONTROL_SAMPLES]), Counter(samples["always-accept"]))
    threshold = float(chi2.isf(FALSE_FAILURE, df))
    print(f"always-accept vs baseline: chi-square {stat:.1f}, df {df}, threshold {threshold:.1f}")
    assert stat > threshold
