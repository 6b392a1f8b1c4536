#!/usr/bin/env python
"""Train a DFlash draft from a teacher cache with the easydel Trainer (cache-first, no teacher forward).

Thin CLI over :mod:`dflash_gptoss.easydel_dflash_trainer` (the seed's script name and flags).
Bad input prints one ``error:`` line and exits with code 2, before any JAX compilation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_gptoss.cli_types import non_negative_float as _non_negative_float  # noqa: E402
from dflash_gptoss.cli_types import positive_float as _positive_float  # noqa: E402
from dflash_gptoss.cli_types import positive_int as _positive_int  # noqa: E402
from dflash_gptoss.distributed import add_distributed_args, initialize_from_args  # noqa: E402
from dflash_gptoss.tpu_plan_cli import add_plan_arguments, run_plans  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The seed's flags plus the optimisation / loss / export flags."""
    p = argparse.ArgumentParser(
        description="Train a DFlash draft for a GPT-OSS teacher from its teacher cache (easydel Trainer, "
                    "dp x tp mesh, exact chunked full-vocab CE against the frozen teacher lm_head).")
    p.add_argument("--cache-dir", required=True,
                   help="teacher cache directory written by scripts/tpu_dflash_build_teacher_cache.py "
                        "(layout 'blocks' or 'windows').")
    p.add_argument("--teacher-snapshot-dir", required=True,
                   help="the teacher's HF snapshot (config.json + safetensors): its frozen embed_tokens and "
                        "lm_head are read from here; it must be the teacher the cache was built with.")
    p.add_argument("--save-directory", required=True,
                   help="checkpoints go to SAVE_DIRECTORY/MODEL_NAME/run-<step>/.")
    p.add_argument("--model-name", default="dflash-draft", help="run name under --save-directory.")
    p.add_argument("--max-training-steps", type=_positive_int, required=True, help="optimizer steps to run.")
    p.add_argument("--total-batch-size", type=_positive_int, default=8,
                   help="GLOBAL batch per step (cache rows: blocks, or windows with many anchors each); "
                        "sharded over dp, so it must be divisible by --dp.")
    p.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1,
                   help="minibatches of --total-batch-size rows accumulated per optimizer step (one step reads "
                        "total_batch_size * accumulation cache rows; gradients are averaged).")
    p.add_argument("--dp", type=_positive_int, default=1, help="data-parallel mesh size (batch axis).")
    p.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel mesh size; the lm_head vocab rows are split over it (V %% tp == 0); "
                        "dp*tp must equal the number of devices (of all hosts together past one host).")
    p.add_argument("--vocab-chunk-size", type=_positive_int, default=8192,
                   help="vocab rows per chunk of the online log-sum-exp (memory ~ rows x chunk per device).")
    p.add_argument("--save-steps", type=_positive_int, default=None,
                   help="checkpoint every N steps (the last step is always saved).")
    p.add_argument("--log-steps", type=_positive_int, default=10,
                   help="log loss, per-slot accuracy, expected accepted length, throughput, lr every N steps.")
    p.add_argument("--learning-rate", type=_positive_float, default=3e-4, help="peak AdamW learning rate.")
    p.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine",
                   help="decay after warmup.")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps.")
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="AdamW weight decay.")
    p.add_argument("--num-draft-layers", type=_positive_int, default=1, help="draft transformer layers.")
    p.add_argument("--loss-decay-gamma", type=_non_negative_float, default=None,
                   help="slot k's loss weight is exp(-(k-1)/gamma); 0 = uniform. Default: the published "
                        "recipes' 4 for block size <= 8, 7 above.")
    p.add_argument("--anchors-per-window", type=_positive_int, default=16,
                   help="'windows' caches only: anchors sampled per window, afresh each step "
                        "(capped at ctx_len - block_size + 1).")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="MASK token id (default: 200000 for gpt-oss vocabularies, else the tokenizer's <|mask|>).")
    p.add_argument("--seed", type=int, default=0, help="draft init, data order and anchor sampling seed.")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest run-<step> under SAVE_DIRECTORY/MODEL_NAME.")
    p.add_argument("--export-dir", default=None,
                   help="after training, write the final draft as a torch/HF folder (config.json + "
                        "model.safetensors) that the benchmark loads.")
    p.add_argument("--summary-json", default=None, help="write the run summary (per-step history) here.")
    add_distributed_args(p)
    add_plan_arguments(p, geometry=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps {args.warmup_steps} must be >= 0")
    if args.total_batch_size % args.dp:
        parser.error(f"--total-batch-size {args.total_batch_size} is not divisible by --dp {args.dp}")
    if args.plan_tpu:  # plan for a named TPU instead of training: no cache or weights read, nothing written
        return run_plans(args, args.plan_tpu, ("train",), args.plan_json)
    for flag in ("cache_dir", "teacher_snapshot_dir"):
        if not Path(getattr(args, flag)).is_dir():
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not a directory")
    initialize_from_args(args, parser)  # before any other JAX use; a no-op for one process

    from dflash_gptoss.cache_format import CacheFormatError
    from dflash_gptoss.easydel_dflash_cache import CacheMismatchError
    from dflash_gptoss.easydel_dflash_trainer import DFlashTrainingSettings, build_trainer, run_training

    settings = DFlashTrainingSettings(
        cache_dir=args.cache_dir, teacher_snapshot_dir=args.teacher_snapshot_dir,
        save_directory=args.save_directory, model_name=args.model_name,
        max_training_steps=args.max_training_steps, total_batch_size=args.total_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, dp=args.dp,
        tp=args.tp, vocab_chunk_size=args.vocab_chunk_size, save_steps=args.save_steps, log_steps=args.log_steps,
        learning_rate=args.learning_rate, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, num_draft_layers=args.num_draft_layers,
        loss_decay_gamma=args.loss_decay_gamma, anchors_per_window=args.anchors_per_window,
        mask_token_id=args.mask_token_id, seed=args.seed, resume=args.resume, export_dir=args.export_dir)
    try:  # every input check happens while building (before compiling); ValueError = bad input here
        built = build_trainer(settings)
    except (ValueError, CacheMismatchError, CacheFormatError, FileNotFoundError, OSError) as exc:
        parser.error(str(exc).replace("\n", " "))
    summary = run_training(settings, built)
    from dflash_gptoss.distributed import is_main_process

    if not is_main_process():  # every process holds the same history; process 0 reports and writes
        return 0
    hist = summary["history"]
    if hist:
        first, last = hist[0], hist[-1]
        print(f"steps {summary['start_step']}->{summary['final_step']}: loss {first['loss']:.4f} -> "
              f"{last['loss']:.4f}, expected accepted length {first['expected_accept_len']:.3f} -> "
              f"{last['expected_accept_len']:.3f}; checkpoint {summary['checkpoint']}"
              + (f"; exported to {summary['export_dir']}" if "export_dir" in summary else ""))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
