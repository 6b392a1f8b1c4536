#!/usr/bin/env python
"""Benchmark DFlash speculative decoding against an explicit KV-cache greedy loop (CPU or GPU).

The two loops run interleaved, --repeats times over the prompts (each pass: baseline then
DFlash on each prompt in turn), and every DFlash output is checked token for token against
the baseline's of the same pass. The headline speedup is total decode time, baseline over
DFlash, from each prompt's median of the repeats, with the median and IQR of the per-prompt
ratios beside it; the run is flagged NOISY when a prompt's repeats disagree by more than 10%.
The per-step costs (one-token step, verify of B tokens, draft proposal) are timed in the same
run, giving the loop efficiency. Writes <out-dir>/bench_<UTC>.json and a PNG histogram of
accepted lengths. Exit code: 0, 1 if any prompt was not token-identical, 2 on bad input, 3 when the
report could not be written (a full disk: the figures are printed, nothing half-written is left).

Sampling (--temperature T > 0, optionally --top-p P): both loops sample the target's law,
the DFlash loop with the speculative-sampling rule; its output is lossless in distribution,
which the tests prove (tests/test_sampling_exact.py, tests/test_sampling_statistical.py),
not token-identical to the baseline's, so no per-prompt check is made and the exit code is 0.
The report adds the mean acceptance probability per slot. Every draw is seeded by --seed.

Long generations: --max-new-tokens may go up to the target's positions: a prompt of P tokens
and N new tokens use positions 0..P+N-2, so P + N - 1 <= max_position_embeddings (2048 on the
tiny teacher: up to 1985 new tokens after its 64-token prompts). Longer is refused up front.

Examples:
  python scripts/dflash_benchmark.py --target tiny --draft oracle
  python scripts/dflash_benchmark.py --target tiny --draft oracle --num-prompts 4 --max-new-tokens 1024
  python scripts/dflash_benchmark.py --target /path/to/gpt-oss-20b --draft /path/to/draft --chat --device cuda
  python scripts/dflash_benchmark.py --target tiny --draft runs/demo/draft --temperature 1.0 --draft-sample sample
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dflash_gptoss.benchmark.core import (
    DEFAULT_CPU_THREADS,
    DEFAULT_REPEATS,
    BenchSettings,
    benchmark_snapshot,
    prepare_outputs,
    summary_lines,
    write_report,
)
from dflash_gptoss.cli_types import positive_int
from dflash_gptoss.run_safety.report_stem import release

REPO = Path(__file__).resolve().parents[1]

EXIT_REPORT_NOT_WRITTEN = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="tiny",
                   help="GPT-OSS Hugging Face snapshot folder (config.json + safetensors + tokenizer), or 'tiny' "
                        "for the embedded tiny teacher (built on first use, then cached). Default: tiny.")
    p.add_argument("--draft", default="random",
                   help="a DFlash draft folder (config.json + model.safetensors), or one of two diagnostic drafts: "
                        "'oracle' (proposes the target's own greedy continuation: the loop's ceiling; at "
                        "--temperature > 0 the baseline's sampled continuation of the same prompt) or 'random' "
                        "(an untrained DFlash draft: the floor). Default: random.")
    p.add_argument("--prompts-file", default=None,
                   help="JSONL, one object per line with 'input_ids', 'messages' (chat) or 'prompt' (text). "
                        "Default: held-out stdlib prompts for the tiny teacher, or built-in chat prompts with --chat.")
    p.add_argument("--num-prompts", type=int, default=20, help="how many prompts to run (default 20).")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="length of each held-out prompt when no --prompts-file is given (default 64).")
    p.add_argument("--chat", action="store_true",
                   help="render prompts with the tokenizer's chat template (Harmony for gpt-oss).")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens to generate per prompt (default 128; >= 2), up to the target's positions: "
                        "prompt tokens + this - 1 <= max_position_embeddings (checked before any model loads).")
    p.add_argument("--block-size", type=int, default=8,
                   help="DFlash block size B: anchor + B-1 proposals per target verify (default 8).")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="target and draft dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    p.add_argument("--out-dir", default=str(REPO / "artifacts" / "dflash_bench"),
                   help="where bench_<UTC timestamp>.json and its PNG go (default artifacts/dflash_bench).")
    p.add_argument("--report-name", default=None,
                   help="file stem of the JSON and PNG (default bench_<UTC timestamp>).")
    p.add_argument("--random-draft-layers", type=int, default=1, help="layers of the 'random' draft (default 1).")
    p.add_argument("--num-context-features", type=int, default=None,
                   help="K target layers feeding the 'random' draft (default: min(5, layers-3)).")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="MASK id for the 'random' draft (default: the tokenizer's <|mask|>, else 200000).")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop a prompt at the tokenizer's EOS (default: always generate --max-new-tokens).")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed passes over the prompts; each prompt's figure is the median of its repeats "
                        f"(default {DEFAULT_REPEATS['cpu']} on CPU, {DEFAULT_REPEATS['cuda']} on CUDA). With 1 the "
                        "noise cannot be measured.")
    p.add_argument("--cpu-threads", type=positive_int, default=DEFAULT_CPU_THREADS,
                   help=f"torch threads on CPU (default {DEFAULT_CPU_THREADS}: with 2+ threads, one core busy with "
                        "another job stalls every op of the decode at the thread barrier; ask for more only where "
                        "the cores are free). Ignored on CUDA.")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run.")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for prompt selection, the random draft and, at --temperature > 0, every sample drawn "
                        "(default 0).")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample at this temperature (> 0) with speculative sampling, lossless in distribution; "
                        "default: greedy (temperature 0), checked token for token per prompt.")
    p.add_argument("--top-p", type=float, default=None,
                   help="with --temperature: sample from the smallest set of most likely tokens whose probability "
                        "reaches P, in (0, 1] (default: no cut).")
    p.add_argument("--draft-sample", choices=["greedy", "sample"], default="greedy",
                   help="with --temperature: the drafter proposes its argmax ('greedy', default) or a sample of its "
                        "own distribution at the same temperature and top-p ('sample'; not with --draft oracle).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = BenchSettings(
        max_new_tokens=args.max_new_tokens, block_size=args.block_size, draft=args.draft,
        random_draft_layers=args.random_draft_layers, num_context_features=args.num_context_features,
        mask_token_id=args.mask_token_id, warmup=not args.no_warmup, seed=args.seed, repeats=args.repeats,
        cpu_threads=args.cpu_threads, temperature=args.temperature or 0.0, top_p=args.top_p,
        draft_sample=args.draft_sample,
    )
    try:
        if args.top_p is not None and args.temperature is None:
            raise ValueError(f"--top-p {args.top_p} needs --temperature > 0 (without it decoding is greedy, which "
                             f"no top-p cut changes); pass e.g. --temperature 1.0 --top-p {args.top_p}.")
        settings.validate()
        out_dir, stem = prepare_outputs(args.out_dir, args.report_name)  # before any model work; takes the stem
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        report = benchmark_snapshot(
            args.target, settings, prompts_file=args.prompts_file, num_prompts=args.num_prompts,
            prompt_tokens=args.prompt_tokens, chat=args.chat, device=args.device, dtype=args.dtype,
            stop_at_eos=args.stop_at_eos,
        )
    except (ValueError, FileNotFoundError) as err:
        release(stem)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        release(stem)  # Ctrl-C or a crash: the name is free again
        raise
    print("\n".join(summary_lines(report)))  # first: the figures survive a report that cannot be written
    try:
        json_path, png_path = write_report(report, out_dir, stem=stem)
    except OSError as err:
        from dflash_gptoss.run_safety.preflight import write_failure_message

        release(stem)
        print(f"error: {write_failure_message(err, 'writing the report')} The figures are printed above; nothing "
              "was written: free space, then rerun the same command.", file=sys.stderr)
        return EXIT_REPORT_NOT_WRITTEN
    print(f"wrote {json_path} and {png_path}")
    return 1 if report["lossless_all"] is False else 0  # None at T > 0: nothing checked per prompt


if __name__ == "__main__":
    raise SystemExit(main())
