"""Benchmark core: KV-cache greedy baseline vs DFlash speculative decoding, same prompts, same run.

Shared by the local CLI (``scripts/dflash_benchmark.py``) and the Modal app
(``modal/dflash_gptoss20b_benchmark.py``). Every prompt's speculative output is
compared token by token with the baseline's; a mismatch is counted and reported,
never hidden (in bf16 on a GPU, near-ties can flip an argmax between the
one-token steps and the block verify).
"""

from __future__ import annotations

import json
import platform
import statistics
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dflash_gptoss.config import (
    default_mask_token_id,
    default_num_context_features,
    make_draft_config,
    target_layer_ids,
)
from dflash_gptoss.decoding import DecodeResult, DFlashDrafter, OracleDrafter, greedy_decode, speculative_decode
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel, check_draft_matches_target
from dflash_gptoss.target import TargetRunner


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

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}.")
        if self.block_size < 2:
            raise ValueError(f"--block-size must be >= 2 (an anchor and at least one proposal), got {self.block_size}.")


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


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = q * (len(ordered) - 1)
    lo, hi = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _loop_stats(result: DecodeResult) -> dict[str, Any]:
    total = result.prefill_s + result.decode_s
    n = len(result.tokens)
    return {
        "new_tokens": n,
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
        "tokens_per_s": n / total if total > 0 else None,
        "decode_tokens_per_s": (n - 1) / result.decode_s if result.decode_s > 0 else None,
        "target_forwards": result.target_forwards,
        "target_forwards_per_token": result.target_forwards / n,
    }


def run_benchmark(
    target_model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: BenchSettings,
    *,
    teacher_label: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Run baseline and DFlash on every prompt; the report DESIGN.md asks for."""
    settings.validate()
    if not prompts:
        raise ValueError("no prompts to benchmark.")
    draft = build_draft(settings, target_model, tokenizer)
    baseline_runner = TargetRunner(target_model, [])
    num_layers = target_model.config.num_hidden_layers
    layer_ids = (draft.target_layer_ids if draft is not None
                 else target_layer_ids(num_layers, default_num_context_features(num_layers)))
    spec_runner = TargetRunner(target_model, layer_ids)
    eos = settings.eos_token_id

    def spec(prompt: list[int], reference: list[int]) -> DecodeResult:
        drafter = OracleDrafter(prompt + reference) if draft is None else DFlashDrafter(draft, target_model)
        return speculative_decode(spec_runner, drafter, prompt, settings.max_new_tokens, settings.block_size, eos)

    try:
        if settings.warmup:  # first calls pay for allocation / kernel selection; keep them out of the figures
            warm = greedy_decode(baseline_runner, prompts[0], min(8, settings.max_new_tokens), eos)
            spec(prompts[0], warm.tokens)
        rows = []
        for index, prompt in enumerate(tqdm(prompts, desc="prompts", disable=not progress)):
            base = greedy_decode(baseline_runner, prompt, settings.max_new_tokens, eos)
            fast = spec(prompt, base.tokens)
            mismatch = _first_mismatch(base.tokens, fast.tokens)
            rows.append({
                "prompt_index": index,
                "prompt_tokens": len(prompt),
                "lossless": mismatch is None,
                "first_mismatch": mismatch,
                "baseline": _loop_stats(base),
                "dflash": _loop_stats(fast),
                "accepted_lengths": fast.accepted_lengths,
                "acceptance_mean": statistics.fmean(fast.accepted_lengths) if fast.accepted_lengths else None,
                "speedup": (base.prefill_s + base.decode_s) / (fast.prefill_s + fast.decode_s),
                "decode_speedup": base.decode_s / fast.decode_s if fast.decode_s > 0 else None,
            })
    finally:
        baseline_runner.close()
        spec_runner.close()
    return _summarize(rows, settings, target_model, draft, teacher_label)


def _summarize(rows, settings, target_model, draft, teacher_label) -> dict[str, Any]:
    accepted = [n for row in rows for n in row["accepted_lengths"]]
    base_time = sum(r["baseline"]["prefill_s"] + r["baseline"]["decode_s"] for r in rows)
    fast_time = sum(r["dflash"]["prefill_s"] + r["dflash"]["decode_s"] for r in rows)
    base_tokens = sum(r["baseline"]["new_tokens"] for r in rows)
    fast_tokens = sum(r["dflash"]["new_tokens"] for r in rows)
    device = target_model.lm_head.weight.device
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
            "target_layer_ids": draft.target_layer_ids if draft is not None else None,
            "draft_layers": draft.config.num_hidden_layers if draft is not None else None,
            "eos_token_id": settings.eos_token_id,
            "seed": settings.seed,
            "torch": torch.__version__,
        },
        "lossless_all": all(r["lossless"] for r in rows),
        "lossless_prompts": sum(r["lossless"] for r in rows),
        "mismatched_prompts": [r["prompt_index"] for r in rows if not r["lossless"]],
        "baseline_tokens_per_s": base_tokens / base_time,
        "dflash_tokens_per_s": fast_tokens / fast_time,
        "speedup_mean": statistics.fmean(r["speedup"] for r in rows),
        "speedup_total": base_time / fast_time,
        "acceptance_hist": {str(k): v for k, v in sorted(Counter(accepted).items())},
        "acceptance_mean": statistics.fmean(accepted) if accepted else None,
        "acceptance_median": statistics.median(accepted) if accepted else None,
        "acceptance_p90": _percentile(accepted, 0.9),
        "prefill_s_mean": statistics.fmean(r["dflash"]["prefill_s"] for r in rows),
        "baseline_target_forwards_per_token": sum(r["baseline"]["target_forwards"] for r in rows) / base_tokens,
        "target_forwards_per_token": sum(r["dflash"]["target_forwards"] for r in rows) / fast_tokens,
        "per_prompt": rows,
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human-readable table of a report."""
    return [
        f"teacher: {report['teacher']}   draft: {report['draft']}   device: {report['device']} ({report['dtype']})",
        f"prompts: {report['settings']['num_prompts']}   max_new_tokens: {report['settings']['max_new_tokens']}   "
        f"block_size: {report['settings']['block_size']}",
        f"lossless: {report['lossless_prompts']}/{report['settings']['num_prompts']} prompts token-identical",
        f"accepted length: mean {report['acceptance_mean']:.2f}  median {report['acceptance_median']}  "
        f"p90 {report['acceptance_p90']:.1f}   hist {report['acceptance_hist']}",
        f"target forwards per token: dflash {report['target_forwards_per_token']:.3f}  "
        f"baseline {report['baseline_target_forwards_per_token']:.3f}",
        f"tokens/s: baseline {report['baseline_tokens_per_s']:.1f}  dflash {report['dflash_tokens_per_s']:.1f}   "
        f"speedup_mean {report['speedup_mean']:.3f}x",
    ]


def write_report(report: dict[str, Any], out_dir: str | Path, *, stem: str | None = None) -> tuple[Path, Path]:
    """``bench_<UTC timestamp>.json`` and a PNG histogram of accepted lengths beside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or "bench_" + datetime.now(UTC).strftime("%Y%m%d_%H%M%S")
    json_path = out / f"{stem}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(json_path)
    png_path = out / f"{stem}_acceptance.png"
    plot_acceptance(report, png_path)
    return json_path, png_path


def plot_acceptance(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = report["settings"]["block_size"]
    hist = {int(k): v for k, v in report["acceptance_hist"].items()}
    xs = list(range(1, block + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.bar(xs, [hist.get(x, 0) for x in xs], color="#3b75af")
    ax.set_xticks(xs)
    ax.set_xlabel("tokens accepted per target forward (accepted length)")
    ax.set_ylabel("verify steps")
    ax.set_title(f"{report['teacher']}\ndraft: {Path(str(report['draft'])).name} | {report['device']} "
                 f"({report['dtype']}) | mean {report['acceptance_mean']:.2f}, "
                 f"speedup_mean {report['speedup_mean']:.2f}x", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
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
    """Load target, tokenizer and prompts, then ``run_benchmark``: what the CLI and Modal app call."""
    from transformers import AutoTokenizer

    from dflash_gptoss.prompts import default_chat_prompts, load_prompts_file
    from dflash_gptoss.target import load_target, resolve_device, resolve_dtype

    settings.validate()
    if num_prompts <= 0:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}.")
    torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    torch_dtype = resolve_dtype(dtype)
    path, label = resolve_target_snapshot(target)
    model = load_target(path, dtype=torch_dtype, device=torch_device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if stop_at_eos and settings.eos_token_id is None:
        settings.eos_token_id = tokenizer.eos_token_id
    if prompts_file:
        prompts = load_prompts_file(prompts_file, tokenizer, chat=chat)[:num_prompts]
    elif chat:
        prompts = default_chat_prompts(tokenizer, num_prompts)
    else:
        from dflash_gptoss.corpus import heldout_prompts

        prompts = heldout_prompts(tokenizer, num_prompts, prompt_tokens, seed=settings.seed)
    report = run_benchmark(model, tokenizer, prompts, settings, teacher_label=label, progress=progress)
    report["target"] = str(path)
    return report
