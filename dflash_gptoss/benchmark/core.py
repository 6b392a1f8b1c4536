"""Benchmark core: KV-cache greedy baseline vs DFlash speculative decoding, same prompts, same run.

Shared by the local CLI (``scripts/dflash_benchmark.py``) and the Modal app
(``modal/dflash_gptoss20b_benchmark.py``). Every prompt's speculative output is
compared token by token with the baseline's, on every repeat; a mismatch is
counted and reported, never hidden (in bf16 on a GPU, near-ties can flip an
argmax between the one-token steps and the block verify).

Figures that hold on a shared machine (``benchmark/stats`` has the definitions):

* the two loops run interleaved: ``R`` passes over the prompts, and within a pass
  each prompt runs baseline then DFlash back to back, so both loops of a prompt
  see the same load, and a burst during one pass is outvoted by the other passes;
* per prompt and loop the MEDIAN of the ``R`` repeats is kept;
* the headline ``speedup`` is the ratio of total decode time, baseline over
  DFlash (sums over prompts of those medians; prefill, which both loops do the
  same way, is left out), reported with the median and IQR of the per-prompt
  ratios, so one fast or slow prompt cannot carry the figure;
* ``noisy`` is set when the repeats of any prompt disagree by more than 10%;
* the per-step costs (``benchmark/decode_costs``) are sampled after every pass, so they
  see the load the loops saw, and ``loop_efficiency`` says how much of what the
  acceptance allows the loop delivers;
* on CPU, the process's CPU time of every call is kept beside the wall time: its
  share of the wall time says how much of the noise was other jobs taking the core.

At temperature 0 every prompt's DFlash output must equal the baseline's token for
token (``guarantee`` "token identity"). At T > 0 the two loops draw different samples
by design: lossless then means the DFlash output has the target's sampling law, which
``tests/test_sampling_exact.py`` (exact, on a small target) and
``tests/test_sampling_statistical.py`` (a chi-square test on the tiny teacher) prove;
a run does not re-check it per prompt, and says so (``guarantee`` "distribution").
Each loop call at T > 0 draws from its own generator, seeded by (``--seed``, prompt,
loop), so every repeat of a prompt redoes the same work and the medians compare like
with like.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dflash_gptoss.benchmark.decode_costs import measure_cost_samples, modelled_speedup, summarize_costs
from dflash_gptoss.benchmark.stats import (
    NOISE_THRESHOLD,
    SPREAD_DEFINITION,
    is_noisy,
    percentile,
    ratio_summary,
    spread,
)
from dflash_gptoss.decoding import (
    DecodeResult,
    DFlashDrafter,
    OracleDrafter,
    Sampling,
    baseline_decode,
    new_generator,
    speculative_decode,
)
from dflash_gptoss.draft_config import (
    default_mask_token_id,
    default_num_context_features,
    make_draft_config,
    target_layer_ids,
)
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel, check_draft_matches_target
from dflash_gptoss.run_safety.preflight import OutputPathError, check_file_stem, check_output_dir, check_output_files
from dflash_gptoss.run_safety.report_stem import Stem, reserve, still_ours
from dflash_gptoss.teacher_torch import TargetRunner, new_target_cache

# Repeats per prompt and loop when --repeats is not given. CPU: 3, the fewest whose median outvotes one
# disturbed repeat, on a machine whose other cores run other jobs. CUDA: 2, chosen without a GPU at hand
# to measure it: a GPU held by one job is not time-sliced, so its repeats should agree
# closely and a third costs minutes per repeat on gpt-oss-20b; 2 still measure the spread, so the noisy
# flag says when that expectation fails (then pass --repeats 3).
DEFAULT_REPEATS = {"cpu": 3, "cuda": 2}
# torch intra-op threads on CPU when --cpu-threads is not given. With 2+ threads every op ends at a thread
# barrier, and one core busy with another job stalls each of the thousands of small ops of a decode: on
# this project's 2-core machine with one core kept busy, the tiny teacher's baseline ran at 26.2 tok/s with
# 1 thread and 4.1 tok/s with 2 (artifacts/dflash_bench/noisy_20261125_152523/threads_*.json). More threads
# can only pay where the cores are free: --cpu-threads N there.
DEFAULT_CPU_THREADS = 1
COST_ROUNDS_PER_PASS = 10  # timed rounds of the per-step costs after each pass (pooled; medians reported)


@dataclass
class BenchSettings:
    max_new_tokens: int = 128
    block_size: int = 8
    draft: str = "random"  # "oracle", "random", or a draft folder
    random_draft_layers: int = 1
    num_context_features: int | None = None  # random draft only; None = as many as the rule allows, up to 5
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    warmup: bool = True
    seed: int = 0
    repeats: int | None = None  # None: DEFAULT_REPEATS for the device
    cpu_threads: int | None = DEFAULT_CPU_THREADS  # None: leave torch's choice
    temperature: float = 0.0  # 0: greedy, token identity checked per prompt; > 0: speculative sampling
    top_p: float | None = None  # T > 0 only
    draft_sample: str = "greedy"  # T > 0: the drafter proposes its argmax ("greedy") or a draw of its q ("sample")

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}.")
        if self.top_p is not None:
            if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
                raise ValueError(f"--top-p must be in (0, 1] (1 = no cut), got {self.top_p}.")
            if self.temperature == 0:
                raise ValueError(f"--top-p {self.top_p} needs --temperature > 0: greedy decoding takes the argmax, "
                                 "which no top-p cut changes. Pass e.g. --temperature 1.0 --top-p "
                                 f"{self.top_p}.")
        if self.draft_sample not in ("greedy", "sample"):
            raise ValueError(f"--draft-sample must be 'greedy' or 'sample', got {self.draft_sample!r}.")
        if self.draft_sample == "sample":
            if self.draft == "oracle":
                raise ValueError("--draft-sample sample needs a draft with a distribution to sample; the oracle "
                                 "only replays the baseline's tokens. Use --draft-sample greedy with --draft oracle.")
            if self.temperature == 0:
                raise ValueError("--draft-sample sample needs --temperature > 0 (at temperature 0 the drafter "
                                 "proposes its argmax).")
        if self.max_new_tokens < 2:
            raise ValueError(f"--max-new-tokens must be >= 2 (the first token comes from the prefill; the decode "
                             f"loops the speedup compares make the rest), got {self.max_new_tokens}.")
        if self.block_size < 2:
            raise ValueError(f"--block-size must be >= 2 (an anchor and at least one proposal), got {self.block_size}.")
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}.")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"--cpu-threads must be >= 1, got {self.cpu_threads}.")
        if self.draft not in ("oracle", "random"):
            check_draft_folder(self.draft)

    def repeats_for(self, device: torch.device) -> int:
        return self.repeats if self.repeats is not None else DEFAULT_REPEATS.get(device.type, 3)

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.draft_sample)


GUARANTEES = {
    "token identity": "every prompt's DFlash output equals the greedy baseline's token for token, checked on every "
                      "repeat",
    "distribution": "the DFlash output has the target's sampling law (temperature, top-p): proven by "
                    "tests/test_sampling_exact.py (the exact law of every output, small target) and "
                    "tests/test_sampling_statistical.py (chi-square on 20,000 samples, tiny teacher); not re-checked "
                    "per prompt, since the two loops draw different samples by design",
}


def call_seed(seed: int, prompt_index: int, loop: int) -> int:
    """The generator seed of one loop call at T > 0: the same for every repeat, distinct per prompt and loop."""
    return int(np.random.SeedSequence([seed, prompt_index, loop]).generate_state(1)[0])


def check_draft_folder(draft: str) -> None:
    """A draft folder whose ``config.json`` parses and whose weights are all on disk, before any model loads."""
    from dflash_gptoss.teacher_snapshot import SnapshotError, read_json_file, read_safetensors_header

    folder = Path(draft).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--draft {draft!r} is not a folder; pass an exported draft folder "
                                "(config.json + model.safetensors), 'oracle' or 'random'.")
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise FileNotFoundError(f"--draft {draft!r} holds no config.json and *.safetensors; pass an exported draft "
                                "folder (the trainer's --export-dir).")
    try:
        read_json_file(folder / "config.json", "the draft's config.json")
        for file in weights:
            read_safetensors_header(file)
    except SnapshotError as e:
        raise ValueError(f"--draft {draft!r}: {e}") from e


def check_positions(prompt_lengths: list[int], max_new_tokens: int, max_positions: int | None) -> None:
    """Refuse a run that would feed the target positions it does not have.

    Both loops feed positions ``0 .. P + N - 2`` for a prompt of P tokens and N new
    tokens: the last token is emitted, never fed back, and the speculative loop
    shrinks its last block to the tokens still owed, so its verify (and the draft's
    block) never reaches past that either. Hence ``P + N - 1 <= max_positions``.
    """
    if max_positions is None or not prompt_lengths:
        return
    longest = max(prompt_lengths)
    if longest + max_new_tokens - 1 <= max_positions:
        return
    index, allowed = prompt_lengths.index(longest), max_positions - longest + 1
    where = (f"prompt {index} has {longest} tokens; with --max-new-tokens {max_new_tokens} the loops would feed "
             f"positions up to {longest + max_new_tokens - 2}, but the target has max_position_embeddings="
             f"{max_positions} (positions 0..{max_positions - 1}).")
    fix = (f"Use --max-new-tokens <= {allowed} with these prompts, or shorter prompts." if allowed >= 2
           else "Use shorter prompts.")
    raise ValueError(f"{where} {fix}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def build_draft(settings: BenchSettings, target_model: torch.nn.Module, tokenizer: Any) -> DFlashDraftModel | None:
    """The DFlash draft to benchmark, or None for the oracle (which needs no model)."""
    target_config = target_model.config
    weight = target_model.lm_head.weight
    if settings.draft == "oracle":
        return None
    if settings.draft == "random":
        torch.manual_seed(settings.seed)
        k = settings.num_context_features or default_num_context_features(target_config.num_hidden_layers)
        mask = settings.mask_token_id
        if mask is None:
            mask = default_mask_token_id(target_config.vocab_size, tokenizer)
        config = make_draft_config(target_config, num_hidden_layers=settings.random_draft_layers,
                                   block_size=settings.block_size, mask_token_id=mask, num_context_features=k)
        draft = DFlashDraftModel(config)
    else:
        draft = DFlashDraftModel.from_pretrained(settings.draft)
        check_draft_matches_target(draft.config, target_config)
        if draft.block_size != settings.block_size:
            raise ValueError(f"the draft was trained with block_size={draft.block_size}, but --block-size is "
                             f"{settings.block_size}; pass --block-size {draft.block_size}.")
    return draft.to(device=weight.device, dtype=weight.dtype).eval()


class NonFiniteOutputError(ValueError):
    """The target's or the draft's logits hold NaN or Inf: no figure of such a run would mean anything."""


@torch.inference_mode()
def check_finite_outputs(target_model: torch.nn.Module, draft: DFlashDraftModel | None, prompt: list[int],
                         layer_ids: list[int], block_size: int) -> None:
    """One prefill of ``prompt`` and one draft proposal after it: both must give finite logits.

    A NaN weight makes every argmax 0, so both loops would emit the same token forever and the run
    would report lossless; the check names which model is broken instead.
    """
    runner = TargetRunner(target_model, layer_ids)
    try:
        first = runner(torch.tensor([prompt], device=target_model.lm_head.weight.device), 0, new_target_cache(),
                       last_only=True)
    finally:
        runner.close()
    if not bool(torch.isfinite(first.logits).all()):
        raise NonFiniteOutputError(
            f"the target's logits are not finite (NaN or Inf) at the first prefill (prompt 0, "
            f"{len(prompt)} tokens): its weights hold NaN or Inf, or --dtype overflows; check the snapshot "
            f"{getattr(target_model.config, '_name_or_path', '')} (try --dtype float32).")
    if draft is None:
        return
    drafter = DFlashDrafter(draft, target_model)
    drafter.begin(first.features)
    logits = drafter.propose_logits(int(first.logits[0, -1].argmax()), len(prompt), block_size - 1)
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError("the draft's logits are not finite (NaN or Inf) at its first proposal (prompt 0): "
                                   "its weights hold NaN or Inf; export the draft again from a good checkpoint.")


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@contextmanager
def _no_gc_pauses() -> Iterator[None]:
    """Keep Python's cyclic GC out of the timed region (as ``timeit`` does); the run collects between passes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loop_stats(results: list[DecodeResult], cpu_s: list[float] | None) -> dict[str, Any]:
    """One loop on one prompt over its repeats: medians, the repeats themselves, their spread.

    ``cpu_s`` (CPU runs only): the process's CPU seconds of each whole call (prefill + decode).
    """
    n = len(results[0].tokens)
    prefill = statistics.median(r.prefill_s for r in results)
    decode = statistics.median(r.decode_s for r in results)
    return {
        "new_tokens": n,
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_s_repeats": [r.prefill_s for r in results],
        "decode_s_repeats": [r.decode_s for r in results],
        "decode_spread": spread([r.decode_s for r in results]),
        "tokens_per_s": n / (prefill + decode),
        "decode_tokens_per_s": (n - 1) / decode if n > 1 else None,
        "target_forwards": results[0].target_forwards,
        "target_forwards_per_token": results[0].target_forwards / n,
        "cpu_s": statistics.median(cpu_s) if cpu_s else None,
        "cpu_s_repeats": cpu_s,
    }


def _prompt_row(index: int, prompt: list[int], measured: dict[str, list], on_cpu: bool,
                identity: bool = True) -> dict[str, Any]:
    """Everything measured on one prompt; losslessness judged on every repeat (``identity``: at T=0 only)."""
    base, fast = measured["base"], measured["fast"]
    mismatches = [_first_mismatch(b.tokens, f.tokens) if identity else None for b, f in zip(base, fast, strict=True)]
    bad = [r for r, m in enumerate(mismatches) if m is not None]
    b = _loop_stats(base, measured["base_cpu"] if on_cpu else None)
    f = _loop_stats(fast, measured["fast_cpu"] if on_cpu else None)
    decodes = b["new_tokens"] > 1 and f["new_tokens"] > 1  # an EOS first token leaves no decode to compare
    return {
        "prompt_index": index,
        "prompt_tokens": len(prompt),
        "lossless": not bad if identity else None,
        "mismatched_repeats": bad,
        "first_mismatch": min((mismatches[r] for r in bad), default=None),
        "baseline": b,
        "dflash": f,
        "accepted_lengths": fast[0].accepted_lengths,
        "slot_accept_probs": fast[0].slot_accept_probs if not identity else None,
        "acceptance_mean": statistics.fmean(fast[0].accepted_lengths) if fast[0].accepted_lengths else None,
        "acceptance_same_every_repeat": all(r.accepted_lengths == fast[0].accepted_lengths for r in fast),
        "decode_speedup": b["decode_s"] / f["decode_s"] if decodes else None,
        "end_to_end_speedup": (b["prefill_s"] + b["decode_s"]) / (f["prefill_s"] + f["decode_s"]),
        "noisy": is_noisy([b["decode_spread"], f["decode_spread"]]),
        "schedule": measured["schedule"],
    }


def cost_context_len(prompt_lengths: list[int], max_new_tokens: int, block_size: int,
                     max_positions: int | None) -> int:
    """Where the per-step costs are timed: the middle of the decode (mean prompt + N/2), within the positions.

    Attention cost grows with the context, so the mid-decode step is the average step of a run.
    """
    middle = round(statistics.fmean(prompt_lengths)) + max_new_tokens // 2
    if max_positions is not None:
        middle = min(middle, max_positions - block_size)
    return max(middle, block_size + 1)


def run_benchmark(
    target_model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: BenchSettings,
    *,
    teacher_label: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Baseline and DFlash on every prompt, interleaved, ``repeats`` times (docs/benchmark.md, "What it reports")."""
    settings.validate()
    if not prompts:
        raise ValueError("no prompts to benchmark.")
    max_positions = getattr(target_model.config, "max_position_embeddings", None)
    check_positions([len(p) for p in prompts], settings.max_new_tokens, max_positions)
    device = target_model.lm_head.weight.device
    repeats = settings.repeats_for(device)
    draft = build_draft(settings, target_model, tokenizer)
    num_layers = target_model.config.num_hidden_layers
    layer_ids = (draft.target_layer_ids if draft is not None
                 else target_layer_ids(num_layers, default_num_context_features(num_layers)))
    baseline_runner = TargetRunner(target_model, [])  # no hooks: the baseline captures no features
    eos = settings.eos_token_id
    sampling = settings.sampling

    def generator(index: int, loop: int) -> torch.Generator | None:  # made outside the timed region
        return None if sampling.greedy else new_generator(call_seed(settings.seed, index, loop), device)

    # Each returns the loop's result and the process's CPU seconds of that call alone.
    def base(index: int, max_new_tokens: int) -> tuple[DecodeResult, float]:
        gen = generator(index, 0)
        with _no_gc_pauses():
            cpu0 = time.process_time()
            result = baseline_decode(baseline_runner, prompts[index], max_new_tokens, eos, sampling=sampling,
                                     generator=gen)
            return result, time.process_time() - cpu0

    def spec(index: int, reference: list[int], max_new_tokens: int) -> tuple[DecodeResult, float]:
        prompt = prompts[index]
        drafter = OracleDrafter(prompt + reference) if draft is None else DFlashDrafter(draft, target_model)
        runner = TargetRunner(target_model, layer_ids)  # feature hooks live only while DFlash runs
        gen = generator(index, 1)
        try:
            with _no_gc_pauses():
                cpu0 = time.process_time()
                result = speculative_decode(runner, drafter, prompt, max_new_tokens, settings.block_size, eos,
                                            sampling=sampling, generator=gen)
                return result, time.process_time() - cpu0
        finally:
            runner.close()

    check_finite_outputs(target_model, draft, prompts[0], layer_ids, settings.block_size)
    if settings.warmup:  # first calls pay for allocation / kernel selection; keep them out of the figures
        warm, _ = base(0, min(8, settings.max_new_tokens))
        spec(0, warm.tokens, min(8, settings.max_new_tokens))
    results: list[dict[str, list]] = [{key: [] for key in ("base", "fast", "base_cpu", "fast_cpu", "schedule")}
                                      for _ in prompts]
    context = cost_context_len([len(p) for p in prompts], settings.max_new_tokens, settings.block_size, max_positions)
    cost_samples: dict[str, list[float]] = {"one": [], "verify": [], "draft": []}
    clock0 = time.perf_counter()
    with tqdm(total=repeats * len(prompts), desc="prompts x repeats", disable=not progress) as bar:
        for repeat in range(repeats):  # R passes; within a pass, baseline then DFlash on each prompt in turn
            gc.collect()
            for index in range(len(prompts)):
                base_start = time.perf_counter() - clock0
                b, b_cpu = base(index, settings.max_new_tokens)
                fast_start = time.perf_counter() - clock0
                f, f_cpu = spec(index, b.tokens, settings.max_new_tokens)
                for key, value in (("base", b), ("fast", f), ("base_cpu", b_cpu), ("fast_cpu", f_cpu)):
                    results[index][key].append(value)
                results[index]["schedule"].append(
                    {"repeat": repeat, "baseline_start_s": base_start, "dflash_start_s": fast_start})
                bar.update()
            # The step costs, sampled after every pass: they see the machine as the loops did.
            with _no_gc_pauses():
                for key, values in measure_cost_samples(target_model, draft, context, COST_ROUNDS_PER_PASS,
                                                        block_size=settings.block_size, layer_ids=layer_ids).items():
                    cost_samples[key] += values
    rows = [_prompt_row(i, prompts[i], r, device.type == "cpu", identity=sampling.greedy)
            for i, r in enumerate(results)]
    costs = summarize_costs(cost_samples, context_len=context, block_size=settings.block_size,
                            drafter="oracle" if draft is None else "dflash")
    return _summarize(rows, settings, repeats, costs, target_model, draft, teacher_label)


def _summarize(rows, settings, repeats, costs, target_model, draft, teacher_label) -> dict[str, Any]:
    accepted = [n for row in rows for n in row["accepted_lengths"]]
    base_decode = sum(r["baseline"]["decode_s"] for r in rows)
    fast_decode = sum(r["dflash"]["decode_s"] for r in rows)
    base_time = base_decode + sum(r["baseline"]["prefill_s"] for r in rows)
    fast_time = fast_decode + sum(r["dflash"]["prefill_s"] for r in rows)
    base_tokens = sum(r["baseline"]["new_tokens"] for r in rows)
    fast_tokens = sum(r["dflash"]["new_tokens"] for r in rows)
    speedup = base_decode / fast_decode
    ratios = [r["decode_speedup"] for r in rows if r["decode_speedup"] is not None]
    spreads = [r[loop]["decode_spread"] for r in rows for loop in ("baseline", "dflash")]
    tau = statistics.fmean(accepted) if accepted else None
    allowed = modelled_speedup(costs, tau) if tau is not None else None
    device = target_model.lm_head.weight.device
    identity = settings.temperature == 0
    guarantee = "token identity" if identity else "distribution"
    return {
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "teacher": teacher_label,
        "target": str(getattr(target_model.config, "_name_or_path", "")),
        "draft": settings.draft,
        "device": device_name(device),
        "dtype": str(target_model.lm_head.weight.dtype).replace("torch.", ""),
        "settings": {
            "max_new_tokens": settings.max_new_tokens,
            "block_size": settings.block_size,
            "num_prompts": len(rows),
            "repeats": repeats,
            "schedule": f"interleaved: {repeats} passes of (for each prompt: baseline, then dflash), each pass "
                        f"followed by {COST_ROUNDS_PER_PASS} rounds of the step costs",
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
            "max_position_embeddings": getattr(target_model.config, "max_position_embeddings", None),
            "target_layer_ids": draft.target_layer_ids if draft is not None else None,
            "draft_layers": draft.config.num_hidden_layers if draft is not None else None,
            "eos_token_id": settings.eos_token_id,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "draft_sample": settings.draft_sample if settings.temperature > 0 else None,
            "seed": settings.seed,
            "torch": torch.__version__,
        },
        "speedup": speedup,
        "speedup_definition": "total decode time baseline / dflash: sums over prompts of each loop's median of "
                              "the repeats (prefill excluded)",
        "speedup_per_prompt": ratio_summary(ratios) if ratios else None,
        "noisy": is_noisy(spreads),
        "noise": {
            "threshold": NOISE_THRESHOLD,
            "spread_definition": SPREAD_DEFINITION,
            "max_spread": max((s for s in spreads if s is not None), default=None),
            "median_spread": (statistics.median([s for s in spreads if s is not None])
                              if any(s is not None for s in spreads) else None),
            "noisy_prompts": [r["prompt_index"] for r in rows if r["noisy"]],
        },
        "cpu_time": _cpu_time_summary(rows),
        "step_costs": {
            **costs,
            "accepted_length_mean": tau,
            "modelled_speedup": allowed,
            "loop_efficiency": speedup / allowed if allowed else None,
        },
        "guarantee": guarantee,
        "guarantee_definition": GUARANTEES[guarantee],
        "lossless_all": all(r["lossless"] for r in rows) if identity else None,
        "lossless_prompts": sum(r["lossless"] for r in rows) if identity else None,
        "mismatched_prompts": [r["prompt_index"] for r in rows if r["lossless"] is False],
        "acceptance_same_every_repeat": all(r["acceptance_same_every_repeat"] for r in rows),
        "baseline_tokens_per_s": base_tokens / base_time,
        "dflash_tokens_per_s": fast_tokens / fast_time,
        "baseline_decode_s_total": base_decode,
        "dflash_decode_s_total": fast_decode,
        "speedup_mean": statistics.fmean(r["end_to_end_speedup"] for r in rows),
        "speedup_total": base_time / fast_time,
        "acceptance_hist": {str(k): v for k, v in sorted(Counter(accepted).items())},
        "acceptance_mean": tau,
        "acceptance_median": statistics.median(accepted) if accepted else None,
        "acceptance_p90": percentile(accepted, 0.9),
        "acceptance_probability_per_slot": None if identity else slot_acceptance(rows, settings.block_size),
        "prefill_s_mean": statistics.fmean(r["dflash"]["prefill_s"] for r in rows),
        "baseline_target_forwards_per_token": sum(r["baseline"]["target_forwards"] for r in rows) / base_tokens,
        "target_forwards_per_token": sum(r["dflash"]["target_forwards"] for r in rows) / fast_tokens,
        "per_prompt": rows,
    }


def slot_acceptance(rows: list[dict[str, Any]], block_size: int) -> list[dict[str, Any]]:
    """Mean acceptance probability ``min(1, p/q)`` of each proposal slot, over the verify steps that reached it.

    A slot is reached when every slot before it was accepted; the first repeat of each prompt is counted.
    """
    per_slot: list[list[float]] = [[] for _ in range(block_size - 1)]
    for row in rows:
        for step in row["slot_accept_probs"]:
            for j, prob in enumerate(step):
                per_slot[j].append(prob)
    return [{"slot": j + 1, "mean": statistics.fmean(v) if v else None, "reached": len(v)}
            for j, v in enumerate(per_slot)]


def _cpu_time_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """CPU runs: how much of the wall time this process had a core, and the loops' ratio in CPU time.

    A busy machine stretches wall time by descheduling the process; CPU time does not
    see that. A share well below 1 says the noise was other jobs taking the core.
    """
    if rows[0]["baseline"]["cpu_s"] is None:
        return None
    loops = ("baseline", "dflash")
    cpu = sum(sum(r[loop]["cpu_s_repeats"]) for r in rows for loop in loops)
    wall = sum(p + d for r in rows for loop in loops
               for p, d in zip(r[loop]["prefill_s_repeats"], r[loop]["decode_s_repeats"], strict=True))
    return {
        "share_of_wall_time": cpu / wall,
        "speedup_end_to_end": sum(r["baseline"]["cpu_s"] for r in rows) / sum(r["dflash"]["cpu_s"] for r in rows),
        "definition": "process CPU seconds of each loop call (prefill + decode); speedup from the per-prompt "
                      "medians; share = CPU seconds / wall seconds over every timed call",
    }


def headline(report: dict[str, Any]) -> str:
    """The one-line figure: total-decode speedup with the per-prompt median and IQR beside it."""
    per = report["speedup_per_prompt"]
    spread_text = f"; per-prompt median {per['median']:.2f}x, IQR {per['q1']:.2f}-{per['q3']:.2f}x" if per else ""
    return f"speedup {report['speedup']:.2f}x (total decode time{spread_text})"


def _noise_line(report: dict[str, Any]) -> str:
    noise, repeats = report["noise"], report["settings"]["repeats"]
    if report["noisy"] is None:
        return "noise: unknown (1 repeat per prompt; --repeats 3 measures it)"
    limit = f"{noise['threshold']:.0%}"
    if report["noisy"]:
        return (f"NOISY: repeats of prompts {noise['noisy_prompts']} disagree by up to {noise['max_spread']:.1%} "
                f"(limit {limit}, (max-min)/median of {repeats} repeats); the machine was busy, so these figures "
                "may not hold: rerun on a quieter machine or with more --repeats")
    return f"noise: ok, repeats agree within {noise['max_spread']:.1%} (limit {limit}; median of {repeats} repeats)"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human-readable table of a report, headline first."""
    s, c = report["settings"], report["step_costs"]
    efficiency = (f"accepted {c['accepted_length_mean']:.2f} allows {c['modelled_speedup']:.2f}x; loop efficiency "
                  f"{c['loop_efficiency']:.2f}" if c["loop_efficiency"] is not None else "no verify steps")
    return [
        ("NOISY " if report["noisy"] else "") + headline(report),
        f"  decode time: baseline {report['baseline_decode_s_total']:.3f} s -> dflash "
        f"{report['dflash_decode_s_total']:.3f} s over {s['num_prompts']} prompts, median of {s['repeats']} "
        f"repeats each, interleaved; speedup_mean {report['speedup_mean']:.2f}x (old figure, end to end)",
        _noise_line(report),
        *([f"cpu time: this process ran {report['cpu_time']['share_of_wall_time']:.0%} of the timed wall time "
           f"(the rest, other jobs had the core); end-to-end speedup in CPU time "
           f"{report['cpu_time']['speedup_end_to_end']:.2f}x"] if report["cpu_time"] else []),
        f"step costs at context {c['context_len']}: one-token step {c['target_forward_1_token_s'] * 1e3:.2f} ms, "
        f"verify of {c['block_size']} {c['target_verify_block_s'] * 1e3:.2f} ms, draft {c['drafter']} "
        f"{c['draft_propose_s'] * 1e3:.2f} ms; {efficiency}",
        f"teacher: {report['teacher']}   draft: {report['draft']}   device: {report['device']} ({report['dtype']})",
        f"prompts: {s['num_prompts']}   max_new_tokens: {s['max_new_tokens']}   block_size: {s['block_size']}   "
        f"repeats: {s['repeats']}   {sampling_text(s)}",
        lossless_line(report),
        f"accepted length: mean {report['acceptance_mean']:.2f}  median {report['acceptance_median']}  "
        f"p90 {report['acceptance_p90']:.1f}   hist {report['acceptance_hist']}",
        *([slot_line(report["acceptance_probability_per_slot"])] if report.get("acceptance_probability_per_slot")
          else []),
        f"target forwards per token: dflash {report['target_forwards_per_token']:.3f}  "
        f"baseline {report['baseline_target_forwards_per_token']:.3f}",
        f"tokens/s (prefill + decode): baseline {report['baseline_tokens_per_s']:.1f}  "
        f"dflash {report['dflash_tokens_per_s']:.1f}",
    ]


def sampling_text(settings: dict[str, Any]) -> str:
    """``greedy`` or ``temperature T, top-p P, draft proposals sampled``, as a run's settings say."""
    temperature = settings.get("temperature") or 0
    if temperature == 0:
        return "decoding: greedy"
    top_p = f", top-p {settings['top_p']}" if settings.get("top_p") is not None else ""
    return f"decoding: temperature {temperature}{top_p}, draft proposals: {settings['draft_sample']}"


def lossless_line(report: dict[str, Any]) -> str:
    """What this run checked: token identity per prompt (T=0), or nothing per prompt (T > 0, proven by tests)."""
    if report.get("guarantee", "token identity") == "token identity":
        return (f"lossless: {report['lossless_prompts']}/{report['settings']['num_prompts']} prompts token-identical "
                "on every repeat")
    return ("lossless: in distribution (T > 0), not checked per prompt: the loops draw different samples by design; "
            "the exact and chi-square tests (tests/test_sampling_*.py) prove the rule")


def slot_line(slots: list[dict[str, Any]]) -> str:
    cells = [f"{s['slot']}: {s['mean']:.3f}" for s in slots if s["mean"] is not None]
    return "mean acceptance probability per slot (over the verifies that reached it): " + "  ".join(cells)


REPORT_FILES = ("{stem}.json", "{stem}_acceptance.png")


def prepare_outputs(out_dir: str | Path, stem: str | None = None) -> tuple[Path, Stem]:
    """Check, before any model work, that the report can be written, and take its stem: (out folder, stem).

    The default stem ``bench_<UTC>`` takes the start time of the run (``_2``, ``_3``, ... when another run took
    it in the same second); an explicit stem that another run holds, or an earlier report has, is refused
    (``run_safety/report_stem``).
    """
    out = check_output_dir(out_dir, "--out-dir", create=True)
    explicit = stem is not None
    name = check_file_stem(stem, "--report-name") if explicit else (
        "bench_" + datetime.now(UTC).strftime("%Y%m%d_%H%M%S"))
    check_output_files([out / f.format(stem=name) for f in REPORT_FILES], "--out-dir/--report-name")
    return out, reserve(out, name, unique=not explicit, siblings=REPORT_FILES[1:])


def write_report(report: dict[str, Any], out_dir: str | Path, *, stem: Stem | str | None = None) -> tuple[Path, Path]:
    """``<stem>.json`` and a PNG histogram of accepted lengths beside it, each written whole or not at all.

    ``stem`` is the one :func:`prepare_outputs` took (else one is taken now). The PNG is written first and
    the JSON last, over the stem's reservation, and only while the reservation is still this run's: a
    report's JSON and PNG always come from the same run.
    """
    held = stem if isinstance(stem, Stem) else prepare_outputs(out_dir, stem)[1]
    json_path, png_path = (held.folder / name.format(stem=held.name) for name in REPORT_FILES)
    if not still_ours(held):
        raise OutputPathError(f"{json_path}: this run's reservation of the report name was replaced by another "
                              "run; nothing was written. Rerun with another --report-name.")
    tmps = [png_path.with_name(png_path.name + ".tmp"), json_path.with_name(json_path.name + ".tmp")]
    try:
        plot_acceptance(report, tmps[0])
        tmps[1].write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:  # a full disk: nothing half-written is left, the reservation stays for the caller
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, e.filename or str(tmps[1])) from e
    tmps[0].replace(png_path)
    tmps[1].replace(json_path)
    return json_path, png_path


def plot_acceptance(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = report["settings"]["block_size"]
    hist = {int(k): v for k, v in report["acceptance_hist"].items()}
    xs = list(range(1, block + 1))
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    ax.bar(xs, [hist.get(x, 0) for x in xs], color="#3b75af")
    ax.set_xticks(xs)
    ax.set_xlabel("tokens accepted per target forward (accepted length)")
    ax.set_ylabel("verify steps")
    ax.set_title(f"{report['teacher']}\ndraft: {Path(str(report['draft'])).name} | {report['device']} "
                 f"({report['dtype']}) | mean {report['acceptance_mean']:.2f}\n{sampling_text(report['settings'])}\n"
                 f"{'NOISY ' if report['noisy'] else ''}{headline(report)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


TINY_TARGET = "tiny"


def resolve_target_snapshot(target: str) -> tuple[Path, str]:
    """A snapshot folder and an honest label for it: the embedded tiny teacher is never called gpt-oss-20b."""
    if target == TINY_TARGET:
        from dflash_gptoss.tiny_teacher import ensure_tiny_teacher

        path = ensure_tiny_teacher()
    else:
        path = Path(target).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"--target {target!r} is not a folder. Pass a local Hugging Face snapshot folder (e.g. from "
                "`huggingface-cli download openai/gpt-oss-20b --local-dir DIR`) or 'tiny' for the embedded default."
            )
    if (path / "tiny_teacher_report.json").is_file():
        return path, "tiny GPT-OSS teacher (embedded default, not gpt-oss-20b)"
    return path, path.name


def benchmark_snapshot(
    target: str,
    settings: BenchSettings,
    *,
    prompts_file: str | None = None,
    num_prompts: int = 20,
    prompt_tokens: int = 64,
    chat: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    stop_at_eos: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Check everything that can be checked, load target, tokenizer and prompts, then ``run_benchmark``.

    What the CLI and the Modal app call. The settings, the draft folder, the prompts and
    their positions are checked before the target's weights load, so bad input costs
    seconds, not a model load. On CPU, torch runs with ``settings.cpu_threads`` threads
    for the run (restored after).
    """
    from transformers import AutoConfig, AutoTokenizer

    from dflash_gptoss.benchmark.prompts import default_chat_prompts, load_prompts_file
    from dflash_gptoss.teacher_torch import check_gpt_oss_snapshot, load_target, resolve_device, resolve_dtype

    settings.validate()
    if num_prompts <= 0:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}.")
    torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    torch_dtype = resolve_dtype(dtype)
    path, label = resolve_target_snapshot(target)
    config = AutoConfig.from_pretrained(check_gpt_oss_snapshot(path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if stop_at_eos and settings.eos_token_id is None:
        settings.eos_token_id = tokenizer.eos_token_id
    if prompts_file:
        prompts = load_prompts_file(prompts_file, tokenizer, chat=chat)[:num_prompts]
    elif chat:
        prompts = default_chat_prompts(tokenizer, num_prompts)
    else:
        from dflash_gptoss.data_corpus import heldout_prompts

        prompts = heldout_prompts(tokenizer, num_prompts, prompt_tokens, seed=settings.seed)
    check_positions([len(p) for p in prompts], settings.max_new_tokens,
                    getattr(config, "max_position_embeddings", None))
    threads = torch.get_num_threads()
    if torch_device.type == "cpu" and settings.cpu_threads is not None:
        torch.set_num_threads(settings.cpu_threads)
    try:
        model = load_target(path, dtype=torch_dtype, device=torch_device)
        report = run_benchmark(model, tokenizer, prompts, settings, teacher_label=label, progress=progress)
    finally:
        torch.set_num_threads(threads)
    report["target"] = str(path)
    return report
