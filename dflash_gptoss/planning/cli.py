"""The planner's command-line side: ``--plan-tpu`` flags, printing, ``--plan-json``, ``--plan-auto-batch``.

Shared by the three scripts that plan (the cache builder, the trainer, ``scripts/plan_tpu_run.py``)
so a plan reads the same everywhere. Nothing here imports jax: bad input is refused (one
``error:`` line, exit code 2) before the planner's heavy imports.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dflash_gptoss.cache_format import human_bytes
from dflash_gptoss.planning.topologies import GIB, known_names
from dflash_gptoss.planning.tpu_plan import DEFAULT_MFU, PlanCompileError, PlanInputError, StepPlan

EXIT_BAD_INPUT = 2
EXIT_COMPILE_ERROR = 1
AUTO_BATCH_MAX = 4096
"""``--plan-auto-batch`` stops doubling here (rows per step)."""


def _mfu(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_plan_arguments(parser: argparse.ArgumentParser, *, topology_flag: str = "--plan-tpu",
                       geometry: bool = False) -> None:
    """The plan flags (``topology_flag`` names the slice); ``geometry`` adds the trainer's cache-geometry flags."""
    g = parser.add_argument_group("TPU plan (compile for a named TPU on this machine instead of running)")
    g.add_argument(topology_flag, metavar="TOPOLOGY", default=None, required=topology_flag != "--plan-tpu",
                   help="compile this run's own step for a Cloud TPU accelerator type and report its per-chip "
                        "memory, FLOPs and estimated time, instead of running; nothing is written but the plan. "
                        f"Known: {', '.join(known_names())}. --dp x --tp must equal its device count "
                        "(v4/v5p: one device per chip). Needs libtpu (installed by scripts/setup_env.sh); the "
                        "model folder may hold only config.json, or name a preset: gpt-oss-20b, gpt-oss-120b.")
    g.add_argument("--mfu", type=_mfu, default=DEFAULT_MFU,
                   help="model FLOPs utilisation assumed for the time estimate, in (0, 1].")
    g.add_argument("--plan-json", default=None, metavar="PATH", help="also write the plan as JSON here.")
    g.add_argument("--plan-auto-batch", action="store_true",
                   help="search the largest batch (a multiple of --dp) that fits, compiling once per try "
                        "(doubling from the given batch, then bisecting); the plan reports that batch.")
    if geometry:
        g.add_argument("--ctx-len", type=int, default=None,
                       help="plan only, when --cache-dir holds no meta.json yet: the cache's --ctx-len.")
        g.add_argument("--block-size", type=int, default=None,
                       help="plan only, when --cache-dir holds no meta.json yet: the cache's --block-size.")
        g.add_argument("--num-context-features", type=int, default=None,
                       help="plan only, when --cache-dir holds no meta.json yet: the cache's --num-context-features.")
        g.add_argument("--layout", choices=("blocks", "windows"), default=None,
                       help="plan only, when --cache-dir holds no meta.json yet: the cache's --layout "
                            "(default blocks).")


# ------------------------------------------------------------------------------ printing
def _b(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if n >= 0.01 * GIB else f"{n / 1024**2:.2f} MiB"


def format_plan(p: StepPlan) -> str:
    """The plan as a few human lines (the JSON holds everything)."""
    s = p.settings
    what = (f"cache build: teacher forward, batch {s['batch_size']} x {s['window_len']} tokens, {s['dtype']}, "
            f"attention {s['attention']}" if p.step == "cache" else
            f"training step: {s['num_draft_layers']}-layer draft ({s['draft_parameters'] / 1e6:.0f}M parameters), "
            f"global batch {s['total_batch_size']} x accumulation {s['gradient_accumulation_steps']}, "
            f"{s['anchors_per_row']} blocks per row, vocab chunk {s['vocab_chunk_size']}")
    m = p.per_chip_bytes
    parts = ", ".join(f"{k.replace('_', ' ')} {_b(v)}" for k, v in m["arguments_breakdown"].items())
    lines = [
        f"TPU plan: {p.topology} ({p.topology_name}, {p.chips} devices, {p.hosts} host(s)), mesh dp={p.mesh['dp']} x "
        f"tp={p.mesh['tp']} -- a compile-time plan, not a run",
        f"  {what}",
        f"  per chip: arguments {_b(m.get('arguments'))} ({parts}), temporaries {_b(m.get('temporaries'))}, "
        f"peak {_b(m.get('peak'))} of {_b(p.hbm_bytes_per_chip)} usable HBM ({p.chip_nominal_hbm} nominal)",
    ]
    if p.flops_per_step_per_chip is not None:
        passes = "" if p.matmul_passes == 1 else f", each FLOP x{p.matmul_passes} (float32 at HIGHEST precision)"
        lines.append(f"  {p.flops_per_step_per_chip:.3e} FLOPs per step per chip; {p.steps} steps; estimated "
                     f"{p.estimated_seconds_per_step:.3f} s/step, {p.estimated_seconds / 3600:.2f} h in all at MFU "
                     f"{p.mfu:g} of {p.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16 per chip{passes} "
                     f"({p.peak_flops_source})")
    io = p.io
    if p.step == "cache":
        lines.append(f"  cache on disk {human_bytes(io['cache_bytes_on_disk'])}, "
                     f"{human_bytes(io['cache_bytes_written_per_step'])} written per step; writing it at a "
                     f"persistent disk's documented limit alone takes {io['hours_if_written_at_pd_limit']:.2f} h")
    else:
        lines.append(f"  cache read per step {human_bytes(io['cache_bytes_read_per_step'])} "
                     f"({io['rows_per_step']} rows x {human_bytes(io['cache_bytes_per_row'])}); reading it at a "
                     f"persistent disk's documented limit alone takes {io['hours_if_read_at_pd_limit']:.2f} h")
    if "auto_batch" in p.settings:
        tried = ", ".join(f"{b}:{'fits' if ok else 'no'}" for b, ok in p.settings["auto_batch"].items())
        lines.append(f"  --plan-auto-batch tried {tried}")
    lines.append(f"  verdict: {p.verdict}")
    if p.compiler_message:
        lines.append("  compiler: " + "\n  compiler: ".join(p.compiler_message.splitlines()[:12]))
    return "\n".join(lines)


def write_plan_json(path: str | Path, doc: dict[str, Any]) -> None:
    """Atomically (temp + rename): a killed plan never leaves half a JSON."""
    from dflash_gptoss.cache_format import write_json_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(path), doc)


def estimated_hours(doc: dict[str, Any]) -> float:
    """The run's compute hours from a plan's JSON: FLOPs x passes x steps / (MFU x peak), as the planner does.

    Plans written before ``matmul_passes`` was recorded get it from :func:`tpu_plan.matmul_passes`
    (their ``estimated_seconds`` counted each float32 teacher FLOP once).
    """
    from dflash_gptoss.planning.tpu_plan import matmul_passes

    passes = doc.get("matmul_passes") or matmul_passes(doc["step"], doc["settings"].get("dtype", "bfloat16"))
    return doc["flops_per_step_per_chip"] * passes * doc["steps"] / (doc["mfu"] * doc["peak_flops_per_chip"]) / 3600


def table_row(doc: dict[str, Any], label: str = "") -> str:
    """One markdown row of a plan's JSON: the README's table is these rows, from ``artifacts/tpu_plan/``."""
    m, st = doc["per_chip_bytes"], doc["settings"]
    what = (f"batch {st['batch_size']}, {st['dtype']}" if doc["step"] == "cache" else
            f"batch {st['total_batch_size']}, {st['num_draft_layers']} layers")
    peak = m.get("peak")
    hours = "-" if doc["flops_per_step_per_chip"] is None else f"{estimated_hours(doc):.2f}"
    io = doc["io"].get("hours_if_written_at_pd_limit", doc["io"].get("hours_if_read_at_pd_limit"))
    return (f"| {doc['step']} | {doc['topology']} | dp={doc['mesh']['dp']} tp={doc['mesh']['tp']}, {what} | "
            f"{'?' if peak is None else f'{peak / GIB:.2f}'} / {doc['hbm_bytes_per_chip'] / GIB:.2f} GiB | "
            f"{'yes' if doc['fits'] else '**no**'} | {hours} | {'-' if io is None else f'{io:.2f}'} | {label} |")


TABLE_HEADER = ("| step | topology | mesh, settings | peak / usable HBM per chip | fits | est. hours (compute, "
                "MFU 0.4) | hours of cache I/O at a PD's limit | note |\n|---|---|---|---|---|---|---|---|")


# ------------------------------------------------------------------------------ auto batch
def largest_fitting_batch(plan_at: Callable[[int], StepPlan], start: int, multiple: int,
                          limit: int = AUTO_BATCH_MAX, log: Callable[[str], None] = print) -> StepPlan:
    """The plan at the largest batch (a multiple of ``multiple``, <= ``limit``) that fits.

    Doubles from ``start`` while it fits (halves while it does not), then bisects between the
    last fit and the first failure. Every try is one compile; each is logged. If not even
    ``multiple`` fits, that plan (``fits: false``) is returned.
    """
    tried: dict[int, StepPlan] = {}

    def at(b: int) -> StepPlan:
        if b not in tried:
            tried[b] = plan_at(b)
            p = tried[b]
            log(f"[plan-auto-batch] batch {b}: " + (f"fits, peak {_b(p.per_chip_bytes['peak'])}" if p.fits
                                                     else "does not fit"))
        return tried[b]

    def down(x: int) -> int:
        return max(multiple, x - x % multiple)

    lo: int | None = None
    hi: int | None = None
    b = down(min(start, limit))
    if at(b).fits:
        lo = b
        while hi is None and lo * 2 <= limit:
            if at(lo * 2).fits:
                lo *= 2
            else:
                hi = lo * 2
    else:
        hi = b
        while lo is None and hi > multiple:
            nxt = down(hi // 2)
            if at(nxt).fits:
                lo = nxt
            else:
                hi = nxt
        if lo is None:
            return at(multiple)  # not even one row per dp shard fits
    while hi is not None and hi - lo > multiple:
        mid = down((lo + hi) // 2)
        if mid <= lo:
            break
        if at(mid).fits:
            lo = mid
        else:
            hi = mid
    best = tried[lo]
    best.settings["auto_batch"] = {k: tried[k].fits for k in sorted(tried)}
    return best


# ------------------------------------------------------------------------------ entry points
STEPS = ("cache", "train")


def cache_planner(args: argparse.Namespace, topology: str) -> Callable[[], StepPlan]:
    """The cache step's planner from the builder's own flags (``--batch-size`` searched with auto batch)."""
    from dflash_gptoss.planning.tpu_plan import plan_cache_step

    def at(batch: int) -> StepPlan:  # plan_cache_step checks its inputs before importing jax
        return plan_cache_step(args.model_snapshot_dir, topology, ctx_len=args.ctx_len, block_size=args.block_size,
                               num_context_features=args.num_context_features, num_blocks=args.num_blocks,
                               batch_size=batch, layout=args.layout, dp=args.dp, tp=args.tp, dtype=args.dtype,
                               mfu=args.mfu)

    if not args.plan_auto_batch:
        return lambda: at(args.batch_size)
    return lambda: largest_fitting_batch(at, args.batch_size, args.dp, limit=min(AUTO_BATCH_MAX, args.num_blocks))


def training_settings(args: argparse.Namespace, total_batch_size: int) -> Any:
    """The run's ``DFlashTrainingSettings`` from parsed trainer flags (same names), batch replaced.

    Every settings field whose name is a parsed flag takes its value, so a plan uses exactly
    the settings the same command line would train with. ``cache_dir`` may not exist yet.
    """
    from dflash_gptoss.cli_types import settings_from_args
    from dflash_gptoss.train_settings import DFlashTrainingSettings

    return settings_from_args(DFlashTrainingSettings, args, total_batch_size=total_batch_size,
                              save_directory=getattr(args, "save_directory", ""))


def _geometry(args: argparse.Namespace) -> dict[str, Any]:
    return {"layout": args.layout, "ctx_len": args.ctx_len, "block_size": args.block_size,
            "num_context_features": args.num_context_features}


def train_planner(args: argparse.Namespace, topology: str) -> Callable[[], StepPlan]:
    """The training step's planner from the trainer's flags (``--total-batch-size`` searched with auto batch)."""
    from dflash_gptoss.planning.tpu_plan import plan_train_step

    def at(batch: int) -> StepPlan:
        return plan_train_step(training_settings(args, batch), topology, geometry=_geometry(args), mfu=args.mfu)

    if not args.plan_auto_batch:
        return lambda: at(args.total_batch_size)
    return lambda: largest_fitting_batch(at, args.total_batch_size, args.dp)


def precheck(step: str, args: argparse.Namespace, topology: str) -> None:
    """The cheap checks of one step's plan, in this process (no jax): PlanInputError on bad input."""
    from dflash_gptoss.planning.tpu_plan import TRAIN_COUNTS, check_cache_request, check_train_request

    if step == "cache":
        check_cache_request(args.model_snapshot_dir, topology, ctx_len=args.ctx_len, block_size=args.block_size,
                            num_context_features=args.num_context_features, num_blocks=args.num_blocks,
                            batch_size=args.batch_size, layout=args.layout, dp=args.dp, tp=args.tp, dtype=args.dtype,
                            mfu=args.mfu)
    else:
        check_train_request(args.teacher_snapshot_dir, topology, dp=args.dp, tp=args.tp, mfu=args.mfu,
                            counts={k: getattr(args, k) for k in TRAIN_COUNTS}, warmup_steps=args.warmup_steps,
                            cache_dir=args.cache_dir, geometry=_geometry(args))


def _plan_child(conn: Any, step: str, args: argparse.Namespace, topology: str, stderr_path: str) -> None:
    """Child process: plan one step, send ``(kind, payload)`` back. Its stderr (libtpu's) goes to a file."""
    import traceback

    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    try:
        plan = (cache_planner if step == "cache" else train_planner)(args, topology)()
        conn.send(("ok", plan.to_json()))
    except PlanInputError as exc:
        conn.send(("input", str(exc)))
    except PlanCompileError as exc:
        conn.send(("compile", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported as one line; the traceback stays in the log file
        traceback.print_exc()
        conn.send(("error", f"{type(exc).__name__}: {exc}".splitlines()[0]))


def _fatal_line(stderr_path: str) -> str:
    """libtpu's own reason for an abort (its ``Check failed`` / fatal log line), if it left one."""
    try:
        text = Path(stderr_path).read_text(errors="replace")
    except OSError:
        return "no message"
    fatal = [ln for ln in text.splitlines() if "Check failed" in ln or ln.startswith("F")]
    return fatal[0].strip() if fatal else (text.strip().splitlines() or ["no message"])[-1]


def plan_in_child(step: str, args: argparse.Namespace, topology: str) -> StepPlan:
    """Run one step's plan in a fresh process, so that a crash of libtpu itself (a C++ ``CHECK``
    failure aborts the whole process; libtpu 0.0.37 does so for some v5p programs) becomes one
    error line here instead of a core dump. Raises PlanInputError / PlanCompileError."""
    import multiprocessing
    import tempfile
    from dataclasses import fields

    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold XLA threads
    receiver, sender = ctx.Pipe(duplex=False)
    log = tempfile.NamedTemporaryFile(prefix=f"dflash_plan_{step}_", suffix=".log", delete=False)
    log.close()
    child = ctx.Process(target=_plan_child, args=(sender, step, args, topology, log.name), daemon=True)
    child.start()
    sender.close()
    try:
        kind, payload = receiver.recv()
    except EOFError:
        kind, payload = "crash", None
    child.join()
    if kind == "crash":
        raise PlanCompileError(f"the TPU compiler (libtpu) aborted while planning the {step} step for {topology} "
                               f"(exit code {child.exitcode}): {_fatal_line(log.name)}; full log: {log.name}")
    if kind == "error":
        raise PlanCompileError(f"planning the {step} step failed: {payload}; full log: {log.name}")
    os.unlink(log.name)
    if kind == "input":
        raise PlanInputError(payload)
    if kind == "compile":
        raise PlanCompileError(payload)
    return StepPlan(**{f.name: payload[f.name] for f in fields(StepPlan)})


def run_plans(args: argparse.Namespace, topology: str, steps: tuple[str, ...], json_path: str | None) -> int:
    """Plan ``steps`` (cheap checks here first, each compile in its own process), print, write the JSON.

    Exit code 2 on bad input (one ``error:`` line, before anything is compiled), 1 when the compiler
    refuses or crashes, 0 otherwise (a plan that does not fit is a plan). One step writes its plan
    object; several write ``{step: plan}``.
    """
    plans: dict[str, StepPlan] = {}
    try:
        for step in steps:
            precheck(step, args, topology)
        for step in steps:
            plans[step] = plan_in_child(step, args, topology)
            print(format_plan(plans[step]), flush=True)
    except PlanInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PlanCompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_COMPILE_ERROR
    if json_path:
        docs = {k: v.to_json() for k, v in plans.items()}
        write_plan_json(json_path, next(iter(docs.values())) if len(docs) == 1 else docs)
        print(f"plan written to {json_path}")
    return 0


__all__ = ["AUTO_BATCH_MAX", "EXIT_BAD_INPUT", "STEPS", "TABLE_HEADER", "add_plan_arguments", "cache_planner",
           "estimated_hours", "format_plan", "largest_fitting_batch", "plan_in_child", "precheck", "run_plans",
           "table_row", "train_planner", "training_settings", "write_plan_json"]
