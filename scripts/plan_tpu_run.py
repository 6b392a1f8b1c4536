#!/usr/bin/env python
"""Plan both paid steps (teacher cache, draft training) for a named TPU, on this machine, before renting it.

Thin CLI over :mod:`dflash_gptoss.planning.tpu_plan`: compiles the builder's teacher forward and the trainer's
optimizer step for the TPU topology (libtpu, no TPU needed, no weights: config.json or a preset name
is enough) and prints per-chip memory, FLOPs and the estimated time of each step. The flags are the
two real scripts' own, with their defaults; ``--plan-json`` writes ``{"cache": plan, "train": plan}``.
Bad input prints one ``error:`` line and exits with code 2 before anything is compiled.

Example (the seed's two commands on a v5e-8, gpt-oss-20b without its weights):
  python scripts/plan_tpu_run.py --topology v5litepod-8 --model-snapshot-dir gpt-oss-20b --dp 2 --tp 4 \\
    --ctx-len 4096 --block-size 8 --num-context-features 4 --num-blocks 4096 --batch-size 4 \\
    --total-batch-size 64 --max-training-steps 2000 --num-draft-layers 8 --plan-json plan.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_gptoss.cli_types import non_negative_float, positive_float, positive_int  # noqa: E402
from dflash_gptoss.planning.cli import STEPS, add_plan_arguments, run_plans  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-snapshot-dir", required=True,
                   help="the teacher: a snapshot folder (config.json is enough) or a preset name "
                        "(gpt-oss-20b, gpt-oss-120b).")
    p.add_argument("--steps", default="cache,train",
                   help="comma-separated steps to plan: cache (the teacher forward of the cache build), "
                        "train (the optimizer step).")
    p.add_argument("--dp", type=positive_int, default=1, help="data-parallel mesh size (both steps).")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel mesh size (both steps).")
    c = p.add_argument_group("cache build (scripts/tpu_dflash_build_teacher_cache.py's flags)")
    c.add_argument("--ctx-len", type=positive_int, required=True,
                   help="context positions per block (blocks layout) / window length (windows layout).")
    c.add_argument("--block-size", type=int, default=8, help="block size B (>= 2).")
    c.add_argument("--num-context-features", type=positive_int, default=4, help="K teacher layers as features.")
    c.add_argument("--num-blocks", type=positive_int, default=4096,
                   help="blocks (blocks layout) or windows (windows layout) the cache holds.")
    c.add_argument("--batch-size", type=positive_int, default=4, help="windows per teacher forward (multiple of dp).")
    c.add_argument("--layout", choices=("blocks", "windows"), default="blocks", help="cache layout.")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="teacher compute dtype.")
    t = p.add_argument_group("training (scripts/tpu_dflash_train_with_easydel_trainer.py's flags)")
    t.add_argument("--cache-dir", default=None,
                   help="an existing cache: its meta.json gives the geometry (else the cache flags above).")
    t.add_argument("--total-batch-size", type=positive_int, default=8, help="global batch (multiple of dp).")
    t.add_argument("--gradient-accumulation-steps", type=positive_int, default=1, help="minibatches per step.")
    t.add_argument("--num-draft-layers", type=positive_int, default=1, help="draft layers (published draft: 8).")
    t.add_argument("--vocab-chunk-size", type=positive_int, default=8192, help="vocab rows per CE chunk.")
    t.add_argument("--anchors-per-window", type=positive_int, default=16, help="windows layout: anchors per row.")
    t.add_argument("--max-training-steps", type=positive_int, default=2000, help="optimizer steps of the run.")
    t.add_argument("--learning-rate", type=positive_float, default=3e-4, help="peak AdamW learning rate.")
    t.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine", help="decay.")
    t.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps.")
    t.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay.")
    t.add_argument("--mask-token-id", type=int, default=None, help="MASK id (default: 200000 for gpt-oss).")
    t.add_argument("--seed", type=int, default=0, help="draft init seed.")
    add_plan_arguments(p, topology_flag="--topology")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        print(f"error: --steps {args.steps!r}: choose from {', '.join(STEPS)} (comma-separated)", file=sys.stderr)
        return 2
    args.teacher_snapshot_dir = args.model_snapshot_dir  # the trainer's name for the same folder
    return run_plans(args, args.topology, tuple(steps), args.plan_json)


if __name__ == "__main__":
    sys.exit(main())
