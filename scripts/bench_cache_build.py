#!/usr/bin/env python
"""Cache build throughput vs a bare teacher forward over the SAME batches, side by side.

Why: writing the cache (bf16 conversion, memmap stores, flush, checkpoint) must not
stall the teacher; the builder overlaps it with the next forward on a writer thread.
This measures both in one process with one compiled teacher, alternating rounds, and
prints tokens/s of each, their ratio (target >= 0.9) and the bytes one block costs.

Default teacher: the tiny GPT-OSS teacher (``tiny_teacher.ensure_tiny_teacher()``) and its
corpus. Figures are for whatever snapshot is given; label them accordingly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-snapshot-dir", default=None, help="GPT-OSS snapshot (default: the tiny teacher).")
    p.add_argument("--data", default=None, help="JSONL data (default: the tiny teacher's corpus).")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--num-context-features", type=int, default=3)
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layout", choices=("blocks", "windows"), default="blocks")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--rounds", type=int, default=3, help="alternating (bare, build) rounds; medians reported.")
    p.add_argument("--out-dir", default=None, help="where the benchmark cache is written (default: a tmp dir).")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file.")
    return p.parse_args(argv)


def bare_forward_seconds(plan, teacher) -> float:
    """The teacher alone over the build's chunks (same ids, same shapes), results fetched to host."""
    from dflash_gptoss.cache_builder import all_chunks, chunk_input_ids

    t0 = time.perf_counter()
    for start in all_chunks(plan):
        ids, _ = chunk_input_ids(plan, start)
        teacher.forward(ids)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dp * args.tp > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.dp * args.tp}"
        )
    from dflash_gptoss.cache_builder import chunk_input_ids, load_teacher, plan_teacher_cache, run_plan
    from dflash_gptoss.cache_format import bytes_per_window

    snapshot = args.model_snapshot_dir
    if snapshot is None:
        from dflash_gptoss.tiny_teacher import ensure_tiny_teacher

        snapshot = str(ensure_tiny_teacher())
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="dflash_cache_bench_")) / "cache"
    settings = dict(
        ctx_len=args.ctx_len,
        block_size=args.block_size,
        num_context_features=args.num_context_features,
        num_blocks=args.num_blocks,
        batch_size=args.batch_size,
        layout=args.layout,
        data=args.data,
        dp=args.dp,
        tp=args.tp,
        dtype=args.dtype,
    )
    plan = plan_teacher_cache(snapshot, out, overwrite=True, **settings)
    teacher = load_teacher(plan)
    teacher.forward(chunk_input_ids(plan, 0)[0])  # compile once, outside every timing
    teacher.embed([0])
    tokens = plan.num_windows * plan.window_len
    bare, build = [], []
    for _ in range(args.rounds):
        bare.append(bare_forward_seconds(plan, teacher))
        plan = plan_teacher_cache(snapshot, out, overwrite=True, **settings)
        build.append(run_plan(plan, teacher, progress=False).seconds)
    bare_s, build_s = statistics.median(bare), statistics.median(build)
    import jax

    figures = {
        "snapshot": str(snapshot),
        "device": f"{jax.devices()[0].platform} x{jax.device_count()} ({os.cpu_count()} host cores)",
        **settings,
        "data": plan.meta["data"]["source"],
        "window_len": plan.window_len,
        "tokens_per_round": tokens,
        "bare_forward_tokens_per_s": tokens / bare_s,
        "cache_build_tokens_per_s": tokens / build_s,
        "ratio_build_over_bare": bare_s / build_s,
        "bare_seconds": bare,
        "build_seconds": build,
        "bytes_per_block" if args.layout == "blocks" else "bytes_per_window": bytes_per_window(plan.specs),
        "cache_nbytes": plan.nbytes,
    }
    print(json.dumps(figures, indent=2))
    print(
        f"bare teacher forward: {tokens / bare_s:,.0f} tokens/s | cache build: {tokens / build_s:,.0f} tokens/s "
        f"| ratio {bare_s / build_s:.3f} (target >= 0.9)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
