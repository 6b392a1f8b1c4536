#!/usr/bin/env python
"""Train a DFlash draft from a teacher cache with the easydel Trainer (cache-first, no teacher forward).

Thin CLI over :mod:`dflash_gptoss.easydel_dflash_trainer` (the seed's script name and flags).
Bad input prints one ``error:`` line and exits with code 2, before any JAX compilation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dflash_gptoss.cli_types import add_settings_arguments, settings_from_args
from dflash_gptoss.distributed import add_distributed_args, initialize_from_args
from dflash_gptoss.planning.cli import add_plan_arguments, run_plans
from dflash_gptoss.train_settings import DFlashTrainingSettings


def build_parser() -> argparse.ArgumentParser:
    """One flag per field of ``DFlashTrainingSettings`` (defaults, types and help live there), plus the
    multi-host and plan flags."""
    p = argparse.ArgumentParser(
        description="Train a DFlash draft for a GPT-OSS teacher from its teacher cache (easydel Trainer, "
                    "dp x tp mesh, exact chunked full-vocab CE against the frozen teacher lm_head).")
    add_settings_arguments(p, DFlashTrainingSettings)
    add_distributed_args(p)
    add_plan_arguments(p, geometry=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        NonFiniteTrainingError,
        build_trainer,
        run_training,
        sampled_accept_text,
    )
    from dflash_gptoss.export_check import ExportCheckError
    from dflash_gptoss.export_draft import NonFiniteWeightsError
    from dflash_gptoss.run_safety.job_lock import LockHeldError
    from dflash_gptoss.run_safety.preflight import write_failure_message

    settings = settings_from_args(DFlashTrainingSettings, args, block_size=None)  # --block-size: plan only
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
