#!/usr/bin/env python
"""Train a DFlash draft from a teacher cache with the easydel Trainer (cache-first, no teacher forward).

Thin CLI over :mod:`dflash_gptoss.easydel_dflash_trainer` (the seed's script name and flags).
Bad input prints one ``error:`` line and exits with code 2, before any JAX compilation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dflash_gptoss.cli_types import non_negative_float as _non_negative_float  # noqa: E402
from dflash_gptoss.cli_types import positive_float as _positive_float  # noqa: E402
from dflash_gptoss.cli_types import positive_int as _positive_int  # noqa: E402
from dflash_gptoss.distributed import add_distributed_args, initialize_from_args  # noqa: E402
from dflash_gptoss.planning.cli import add_plan_arguments, run_plans  # noqa: E402


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
                   help="continue from the latest run-<step> under SAVE_DIRECTORY/MODEL_NAME (verified against its "
                        "manifest; the draft's shape and data settings must match the run's). An error when there "
                        "is no checkpoint, so a mistyped --model-name never restarts training silently.")
    p.add_argument("--resume-if-possible", action="store_true",
                   help="like --resume, but start afresh when SAVE_DIRECTORY/MODEL_NAME holds no checkpoint "
                        "(for scripts that rerun one command). Without either flag, a folder that already holds "
                        "checkpoints is refused.")
    p.add_argument("--allow-new-cache", action="store_true",
                   help="with --resume: continue although --cache-dir (or --eval-cache-dir) is not the cache the run "
                        "trained on (a resume onto another cache is refused otherwise); the switch is recorded in "
                        "the run's dflash_run.json.")
    p.add_argument("--verify-cache", choices=("auto", "size", "full"), default="auto",
                   help="how deeply the cache is checked against its manifest before training: 'size' (every file "
                        "present at its size; instant), 'full' (every byte re-hashed, ~1.4 GB/s), 'auto' (full up "
                        "to 4 GiB, else size; scripts/dflash_verify.py checks a large cache fully).")
    p.add_argument("--export-dir", default=None,
                   help="after training, write the final draft as a torch/HF folder (config.json + "
                        "model.safetensors + its modeling code, loadable with AutoModel and trust_remote_code) that "
                        "the benchmark and serving engines load. Checked before training (a new or empty folder, or an "
                        "earlier draft, which is replaced); written to a temporary folder, checked (--export-check-"
                        "blocks), then renamed into place.")
    p.add_argument("--summary-json", default=None,
                   help="write the run summary here (per-step history, eval_history, export_check).")
    p.add_argument("--eval-cache-dir", default=None,
                   help="a HELD-OUT teacher cache (same teacher and geometry as --cache-dir, built from data the "
                        "training cache never saw): its fixed seeded blocks are scored at the first step, every "
                        "--eval-steps and the last step (loss, per-slot accuracy, teacher-forced accepted length "
                        "as the benchmark counts it: mean, median, p90, histogram).")
    p.add_argument("--eval-steps", type=_positive_int, default=None,
                   help="evaluate on --eval-cache-dir every N steps (besides the first and the last).")
    p.add_argument("--keep-best", action="store_true",
                   help="export the evaluated step with the best held-out mean accepted length instead of the last "
                        "(among this run's evaluations; needs --eval-cache-dir).")
    p.add_argument("--eval-temperature", type=float, default=None,
                   help="also report, at each evaluation, the expected accepted length when sampling at this "
                        "temperature (> 0) with the draft's argmax proposals: 1 + sum_k prod_{j<=k} p_j(x_j), p the "
                        "teacher's law at T, computed once at start from the teacher (needs --eval-cache-dir, "
                        "windows layout).")
    p.add_argument("--eval-top-k", type=_positive_int, default=32,
                   help="with --eval-temperature: teacher probabilities kept per position (default 32); a proposal "
                        "outside them bounds the figure, reported as lower-upper.")
    p.add_argument("--export-check-blocks", type=_positive_int, default=1024,
                   help="blocks on which the exported torch draft must reproduce the JAX draft's accepted length "
                        "(within 0.02) and slot accuracies (within 0.01) before the export is put in place; "
                        "held-out blocks when --eval-cache-dir is given, else training-cache blocks.")
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
    from dflash_gptoss.export_draft import check_export_dir
    from dflash_gptoss.run_safety.preflight import OutputPathError, check_output_dir, check_output_file

    try:  # every output path, before anything expensive (not after hours of training)
        check_output_dir(Path(args.save_directory) / args.model_name, "--save-directory/--model-name")
        if args.summary_json:
            check_output_file(args.summary_json, "--summary-json")
        if args.export_dir:
            check_export_dir(args.export_dir)
    except OutputPathError as exc:
        parser.error(str(exc))
    initialize_from_args(args, parser)  # before any other JAX use; a no-op for one process
    from dflash_gptoss.distributed import is_main_process
    from dflash_gptoss.run_safety.report_stem import release, reserve_writer

    writer = None
    if args.summary_json and is_main_process():  # one writer per summary file while this run lasts
        summary_path = Path(args.summary_json).absolute()
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            writer = reserve_writer(summary_path, "--summary-json")
        except OutputPathError as exc:
            parser.error(str(exc))
    try:
        return _train(args, parser)
    finally:
        if writer is not None:
            release(writer)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Everything after the output checks: build, train, export, report (``main`` holds the summary's writer)."""
    from dflash_gptoss.cache_format import CacheFormatError
    from dflash_gptoss.easydel_dflash_cache import CacheMismatchError
    from dflash_gptoss.easydel_dflash_trainer import (
        CheckpointWriteError,
        DFlashTrainingSettings,
        NonFiniteTrainingError,
        build_trainer,
        run_training,
        sampled_accept_text,
    )
    from dflash_gptoss.export_check import ExportCheckError
    from dflash_gptoss.export_draft import NonFiniteWeightsError
    from dflash_gptoss.run_safety.job_lock import LockHeldError
    from dflash_gptoss.run_safety.preflight import write_failure_message

    settings = DFlashTrainingSettings(
        cache_dir=args.cache_dir, teacher_snapshot_dir=args.teacher_snapshot_dir,
        save_directory=args.save_directory, model_name=args.model_name,
        max_training_steps=args.max_training_steps, total_batch_size=args.total_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, dp=args.dp,
        tp=args.tp, vocab_chunk_size=args.vocab_chunk_size, save_steps=args.save_steps, log_steps=args.log_steps,
        learning_rate=args.learning_rate, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, num_draft_layers=args.num_draft_layers,
        loss_decay_gamma=args.loss_decay_gamma, anchors_per_window=args.anchors_per_window,
        mask_token_id=args.mask_token_id, seed=args.seed, resume=args.resume,
        resume_if_possible=args.resume_if_possible, allow_new_cache=args.allow_new_cache,
        verify_cache=args.verify_cache, export_dir=args.export_dir,
        eval_cache_dir=args.eval_cache_dir, eval_steps=args.eval_steps, keep_best=args.keep_best,
        eval_temperature=args.eval_temperature, eval_top_k=args.eval_top_k,
        export_check_blocks=args.export_check_blocks)
    from dflash_gptoss.run_safety.stop_signals import StopRequested, report, stop_on_signals

    with stop_on_signals() as stop_flag:  # from here on Ctrl-C / SIGTERM stop at a step boundary
        try:  # every input check happens while building (before compiling); ValueError = bad input here
            built = build_trainer(settings)
        except (ValueError, CacheMismatchError, CacheFormatError, FileNotFoundError, OSError, LockHeldError) as exc:
            parser.error(str(exc).replace("\n", " "))
        if stop_flag:
            if built[0].run_lock is not None:
                built[0].run_lock.release()
            return report(StopRequested(stop_flag.signum, "before training started", "nothing was written."),
                          sys.argv)
        try:
            summary = run_training(settings, built)
        except StopRequested as stop:
            return report(stop, sys.argv)
        except (CheckpointWriteError, ExportCheckError, NonFiniteWeightsError, NonFiniteTrainingError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # the export or another write after training
            print(f"error: {write_failure_message(exc, 'writing the training outputs')} The checkpoints are kept: "
                  "rerun with --resume (and a writable --export-dir) to export them.", file=sys.stderr)
            return 1
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
    for entry in summary["eval_history"][-1:]:
        best = summary["best_eval_step"]
        print(f"held-out accepted length per verify step at step {entry['step']}: mean "
              f"{entry['eval_accept_len_mean']:.3f}, median {entry['eval_accept_len_median']:g}, p90 "
              f"{entry['eval_accept_len_p90']:g} ({entry['eval_walk_steps']} steps of a greedy walk over "
              f"{entry['eval_blocks']} held-out blocks)" + (f"; best at step {best}" if best is not None else ""))
        if "eval_temperature" in entry:
            print(f"held-out expected accepted length at temperature {entry['eval_temperature']:g} (argmax "
                  f"proposals, per block): {sampled_accept_text(entry)}; mean acceptance probability per slot "
                  + " ".join(f"{p:.3f}" for p in entry["eval_slot_accept_prob"]))
    check = summary.get("export_check")
    if check:
        print(f"export check (step {summary['exported_step']}, {summary['exported_from']}): accepted length JAX "
              f"{check['jax_accept_len_mean']:.4f} vs exported torch {check['torch_accept_len_mean']:.4f} on "
              f"{check['num_anchors']} {check['blocks_from']} blocks: passed")
    if args.summary_json:
        from dflash_gptoss.cache_format import write_json_atomic

        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.summary_json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
