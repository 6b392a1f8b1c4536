#!/usr/bin/env python
"""Build the DFlash teacher cache: run the GPT-OSS teacher (JAX) once, write an mmap cache.

Thin CLI over ``dflash_gptoss.cache_builder``. Every input is validated before jax
or the teacher is loaded; bad input prints one ``error:`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys

from dflash_gptoss.cache_settings import CacheBuildSettings
from dflash_gptoss.cli_types import add_settings_arguments
from dflash_gptoss.distributed import add_distributed_args, initialize_from_args
from dflash_gptoss.planning.cli import add_plan_arguments, run_plans

EXIT_BAD_INPUT = 2
EXIT_WRITE_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Layouts: 'blocks' (the seed's) stores one block per window: context_features_u16.npy "
        "[blocks, ctx_len, K*H], anchor_embedding_u16.npy [blocks, H], target_ids.npy [blocks, block_size]. "
        "'windows' stores features_u16.npy [windows, ctx_len, K*H], token_ids.npy and labels.npy "
        "[windows, ctx_len] for every position, so the trainer samples many anchors per window; there "
        "--num-blocks is the number of WINDOWS. meta.json describes every array. Blocks: target_ids[:, 0] is "
        "the anchor (position ctx_len), target_ids[:, k] the teacher's greedy token AT position ctx_len+k. "
        "Windows start at offsets drawn uniformly by --seed from the EOS-joined token stream (they may "
        "overlap); window_offsets.npy records them. A killed build continues with --resume (same flags) "
        "and gives byte-identical arrays; the cache is marked complete in meta.json only at the end.",
    )
    add_settings_arguments(p, CacheBuildSettings)
    add_distributed_args(p)
    add_plan_arguments(p)
    p.epilog += (
        " Multi-host: every host runs the same command (add --coordinator-address/--num-processes/--process-id, "
        "or --distributed-auto); --dp x --tp spans all hosts' devices, each host feeds and writes only the rows "
        "of each chunk that its own devices hold, straight into the shared --out-dir; process 0 alone creates "
        "and preallocates the files, checkpoints progress (after a barrier) and marks the cache complete. "
        "--out-dir must be on a POSIX filesystem every host mounts (NFS/Filestore, Lustre, ...) that takes "
        "concurrent writes to disjoint byte ranges of one file; object-store mounts such as GCS-fuse do not.")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plan_tpu:  # plan for a named TPU instead of building: no data read, nothing written but the plan
        return run_plans(args, args.plan_tpu, ("cache",), args.plan_json)
    initialize_from_args(args, parser)  # before any other JAX use; a no-op for one process
    from dflash_gptoss.cache_builder import (
        check_teacher_snapshot,
        load_teacher,
        open_out_dir,
        plan_teacher_cache,
        run_plan,
    )
    from dflash_gptoss.cache_format import bytes_per_window
    from dflash_gptoss.run_safety.preflight import write_failure_message

    try:
        plan = plan_teacher_cache(
            args.model_snapshot_dir,
            args.out_dir,
            ctx_len=args.ctx_len,
            block_size=args.block_size,
            num_context_features=args.num_context_features,
            num_blocks=args.num_blocks,
            batch_size=args.batch_size,
            layout=args.layout,
            data=args.data,
            seed=args.seed,
            dp=args.dp,
            tp=args.tp,
            dtype=args.dtype,
            resume=args.resume,
            overwrite=args.overwrite,
            free_bytes=args.assume_free_bytes,
            progress=not args.no_progress,
        )
        check_teacher_snapshot(plan)  # weights' headers and tokenizer: a damaged snapshot leaves no folder behind
        arrays = open_out_dir(plan)  # the cache's disk space is reserved here, before the teacher loads
        teacher = None if plan.already_complete else load_teacher(plan)  # heavy: jax/easydel from here
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from dflash_gptoss.cache_builder import CacheBuildError
    from dflash_gptoss.distributed import is_main_process
    from dflash_gptoss.run_safety.stop_signals import StopRequested, report, stop_on_signals

    try:
        with stop_on_signals():  # Ctrl-C / SIGTERM: stop after the chunk in flight, keeping every written chunk
            result = run_plan(plan, teacher, progress=not args.no_progress, arrays=arrays)
    except StopRequested as stop:
        return report(stop, sys.argv)
    except CacheBuildError as e:  # multi-host: the hosts do not share --out-dir
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # e.g. the disk filled while progress was being recorded
        print(f"error: {write_failure_message(e, f'writing the teacher cache in {plan.out_dir}')} Every chunk "
              "recorded so far is kept: fix the cause, then rerun the same command with --resume.", file=sys.stderr)
        return EXIT_WRITE_FAILED
    if not is_main_process():
        return 0
    if plan.already_complete:
        print(f"{plan.out_dir} already holds this cache, complete; nothing to do.")
    else:
        print(
            f"wrote {result.windows_written} windows ({result.tokens_processed} tokens) to {result.out_dir} "
            f"in {result.seconds:.1f}s ({result.tokens_per_second:.0f} tokens/s); "
            f"{bytes_per_window(plan.specs)} bytes per {'block' if plan.layout == 'blocks' else 'window'}."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
