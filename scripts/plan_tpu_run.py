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

from dflash_gptoss.cache_settings import CacheBuildSettings
from dflash_gptoss.cli_types import add_settings_arguments
from dflash_gptoss.planning.cli import STEPS, add_plan_arguments, run_plans
from dflash_gptoss.train_settings import DFlashTrainingSettings

CACHE_FLAGS = ("ctx_len", "block_size", "num_context_features", "num_blocks", "batch_size", "layout", "dtype")
"""The builder's settings that shape its compiled step (the rest are paths and run switches)."""
TRAIN_FLAGS = ("cache_dir", "total_batch_size", "gradient_accumulation_steps", "num_draft_layers",
               "vocab_chunk_size", "anchors_per_window", "max_training_steps", "learning_rate", "lr_schedule",
               "warmup_steps", "weight_decay", "loss_decay_gamma", "mask_token_id", "seed")
"""The trainer's settings that shape its compiled step or the plan's estimate."""
LEFT_OUT = ("num_blocks", "cache_dir", "max_training_steps")
"""Required by their scripts, optional here: a plan of one step needs only that step's (None when absent)."""


def build_parser() -> argparse.ArgumentParser:
    """The two scripts' own flags, taken from their settings dataclasses (same names, defaults, help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(p, CacheBuildSettings, only=("model_snapshot_dir", "dp", "tp"))
    p.add_argument("--steps", default="cache,train",
                   help="comma-separated steps to plan: cache (the teacher forward of the cache build), "
                        "train (the optimizer step).")
    c = p.add_argument_group("cache build (scripts/tpu_dflash_build_teacher_cache.py's flags)")
    add_settings_arguments(c, CacheBuildSettings, only=CACHE_FLAGS, optional=LEFT_OUT)
    t = p.add_argument_group("training (scripts/tpu_dflash_train_with_easydel_trainer.py's flags)")
    add_settings_arguments(t, DFlashTrainingSettings, only=TRAIN_FLAGS, optional=LEFT_OUT)
    add_plan_arguments(p, topology_flag="--topology")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        print(f"error: --steps {args.steps!r}: choose from {', '.join(STEPS)} (comma-separated)", file=sys.stderr)
        return 2
    for step, name in (("cache", "num_blocks"), ("train", "max_training_steps")):
        if step in steps and getattr(args, name) is None:
            flag = "--" + name.replace("_", "-")
            print(f"error: planning the {step} step needs {flag} (the run's own value: it sets the plan's hours)",
                  file=sys.stderr)
            return 2
    args.teacher_snapshot_dir = args.model_snapshot_dir  # the trainer's name for the same folder
    return run_plans(args, args.topology, tuple(steps), args.plan_json)


if __name__ == "__main__":
    sys.exit(main())
