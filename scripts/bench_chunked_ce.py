#!/usr/bin/env python
"""Chunked, tp-sharded cross-entropy vs dense-logits cross-entropy: peak memory and step time.

Both losses get the same inputs (``hidden [N, H]``, ``lm_head [V, H]``, ``labels [N]``)
and are timed as one jitted ``value_and_grad`` w.r.t. ``hidden`` (with the argmax
``pred`` as aux, as a training step uses it for accuracy). Why these measurements:

* XLA's ``compiled.memory_analysis()`` gives the buffers the compiled step needs beyond
  its arguments (temp + output, per device), which is what ``[N, V]`` logits inflate.
* Peak process RSS is measured too, each variant in its own child process (the kernel's
  high-water mark is per process, so two variants in one process would hide each other),
  as ``peak RSS during the runs - RSS after the inputs exist``; the high-water mark is
  reset (``/proc/self/clear_refs``) once the inputs exist so their creation's transient
  copies don't count.
* Step time is the median of ``--repeats`` runs after ``--warmup`` runs, once per variant
  alone (the memory child) and once with both variants compiled in one process and their
  runs alternating: on a shared machine the load drifts, and alternating exposes both
  variants to the same drift. The headline ratio is the interleaved median (min shown too).

Example (gpt-oss vocab, small hidden size, CPU)::

    .venv/bin/python scripts/bench_chunked_ce.py --vocab 201088 --hidden 256 --rows 2048 \\
        --vocab-chunk-size 8192 --json artifacts/bench_chunked_ce.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=201088, help="vocabulary size V (rows of lm_head); gpt-oss: 201088")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H (columns of lm_head)")
    p.add_argument("--rows", type=int, default=2048, help="rows N (batch x positions) of hidden states and labels")
    p.add_argument("--vocab-chunk-size", type=int, default=8192, help="vocab rows per step of the chunked loop")
    p.add_argument("--dp", type=int, default=1, help="mesh size of the row (data-parallel) axis")
    p.add_argument("--tp", type=int, default=1, help="mesh size of the vocab (tensor-parallel) axis")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compilation")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for the random inputs")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", choices=("chunked", "dense", "interleaved"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) so input creation's transients don't count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """VmHWM (peak RSS since the last reset) in bytes; falls back to ru_maxrss (peak since start)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _setup(args: argparse.Namespace, variants: tuple[str, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs on the mesh and each variant's compiled ``value_and_grad`` step (imports jax lazily)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from dflash_gptoss.train_sharded_ce import chunked_sharded_cross_entropy, dense_cross_entropy

    mesh = Mesh(np.array(jax.devices()[: args.dp * args.tp]).reshape(args.dp, args.tp), ("dp", "tp"))
    k = jax.random.split(jax.random.key(args.seed), 3)
    hidden = jax.device_put(
        jax.random.normal(k[0], (args.rows, args.hidden), jnp.float32), NamedSharding(mesh, P("dp", None))
    )
    lm_head = jax.device_put(
        jax.random.normal(k[1], (args.vocab, args.hidden), jnp.float32) / np.sqrt(args.hidden),
        NamedSharding(mesh, P("tp", None)),
    )
    labels = jax.device_put(jax.random.randint(k[2], (args.rows,), 0, args.vocab), NamedSharding(mesh, P("dp")))
    jax.block_until_ready((hidden, lm_head, labels))

    def chunked(h: jax.Array, w: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        return chunked_sharded_cross_entropy(h, w, y, mesh=mesh, vocab_chunk_size=args.vocab_chunk_size)

    steps: dict[str, Any] = {}
    for name in variants:
        ce = chunked if name == "chunked" else dense_cross_entropy

        def loss(h: jax.Array, w: jax.Array, y: jax.Array, ce: Any = ce) -> tuple[jax.Array, tuple[jax.Array, ...]]:
            nll, pred = ce(h, w, y)
            return jnp.mean(nll), (nll, pred)

        t0 = time.perf_counter()
        steps[name] = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(hidden, lm_head, labels).compile()
        steps[name + "_compile_s"] = time.perf_counter() - t0
    return (hidden, lm_head, labels), steps


def _interleaved_times(args: argparse.Namespace) -> dict[str, list[float]]:
    """Both variants in one process, runs alternating, so load changes on a shared machine hit both alike."""
    import jax

    inputs, steps = _setup(args, ("chunked", "dense"))
    for _ in range(args.warmup):
        for name in ("chunked", "dense"):
            jax.block_until_ready(steps[name](*inputs))
    times: dict[str, list[float]] = {"chunked": [], "dense": []}
    for _ in range(args.repeats):
        for name in ("chunked", "dense"):
            t0 = time.perf_counter()
            jax.block_until_ready(steps[name](*inputs))
            times[name].append(time.perf_counter() - t0)
    return times


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant alone in this process: memory (XLA + RSS), isolated timing, loss/grad checks."""
    import jax
    import jax.numpy as jnp

    (hidden, lm_head, labels), steps = _setup(args, (args.worker,))
    compiled, compile_s = steps[args.worker], steps[args.worker + "_compile_s"]
    mem = compiled.memory_analysis()
    rss_base = _rss_bytes()
    hwm_reset = _reset_peak_rss()
    out = None
    for _ in range(args.warmup):
        out = jax.block_until_ready(compiled(hidden, lm_head, labels))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(hidden, lm_head, labels))
        times.append(time.perf_counter() - t0)
    peak_rss = _peak_rss_bytes()
    (value, (nll, pred)), grad = out
    return {
        "variant": args.worker,
        "compile_s": compile_s,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "xla_temp_bytes": mem.temp_size_in_bytes,
        "xla_output_bytes": mem.output_size_in_bytes,
        "xla_argument_bytes": mem.argument_size_in_bytes,
        "xla_peak_bytes": mem.temp_size_in_bytes + mem.output_size_in_bytes,
        "rss_peak_delta_bytes": max(0, peak_rss - rss_base),
        "rss_hwm_reset": hwm_reset,
        "loss": float(value),
        "grad_norm": float(jnp.linalg.norm(grad)),
        "pred_checksum": int(jnp.sum(pred.astype(jnp.int64) if jax.config.x64_enabled else pred)),
        "devices": f"{jax.devices()[0].platform} x{args.dp * args.tp}",
    }


def _run_child(args: argparse.Namespace, variant: str) -> Any:
    """Run one variant in a fresh process so its peak RSS is its own."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    n_dev = args.dp * args.tp
    if n_dev > 1 and "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_dev}").strip()
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", variant]
    res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        print(json.dumps(_interleaved_times(args) if args.worker == "interleaved" else _worker(args)))
        return 0
    chunked = _run_child(args, "chunked")
    dense = _run_child(args, "dense")
    inter = _run_child(args, "interleaved")
    inter_med = {k: statistics.median(v) for k, v in inter.items()}
    inter_min = {k: min(v) for k, v in inter.items()}
    logits_bytes = args.rows * args.vocab * 4
    rows = [
        ("XLA temp+output (MiB)", _mib(chunked["xla_peak_bytes"]), _mib(dense["xla_peak_bytes"])),
        ("peak RSS delta (MiB)", _mib(chunked["rss_peak_delta_bytes"]), _mib(dense["rss_peak_delta_bytes"])),
        ("step s, alone, median", f"{chunked['step_s_median']:.3f}", f"{dense['step_s_median']:.3f}"),
        ("step s, interleaved, med", f"{inter_med['chunked']:.3f}", f"{inter_med['dense']:.3f}"),
        ("step s, interleaved, min", f"{inter_min['chunked']:.3f}", f"{inter_min['dense']:.3f}"),
        ("compile (s)", f"{chunked['compile_s']:.2f}", f"{dense['compile_s']:.2f}"),
        ("loss", f"{chunked['loss']:.6f}", f"{dense['loss']:.6f}"),
        ("grad norm", f"{chunked['grad_norm']:.6f}", f"{dense['grad_norm']:.6f}"),
    ]
    ratios = {
        "xla_peak_ratio": chunked["xla_peak_bytes"] / max(1, dense["xla_peak_bytes"]),
        "rss_peak_ratio": chunked["rss_peak_delta_bytes"] / max(1, dense["rss_peak_delta_bytes"]),
        "step_time_ratio_alone_median": chunked["step_s_median"] / dense["step_s_median"],
        "step_time_ratio": inter_med["chunked"] / inter_med["dense"],
        "step_time_ratio_min": inter_min["chunked"] / inter_min["dense"],
    }
    print(
        f"N={args.rows} H={args.hidden} V={args.vocab} chunk={args.vocab_chunk_size} mesh dp={args.dp} tp={args.tp} "
        f"({chunked['devices']}); one [N, V] f32 logits array = {_mib(logits_bytes)} MiB"
    )
    print(f"{'':24}{'chunked':>14}{'dense':>14}")
    for name, a, b in rows:
        print(f"{name:24}{a:>14}{b:>14}")
    print(
        f"chunked/dense: XLA peak {ratios['xla_peak_ratio']:.4f} (goal <= 0.125), "
        f"RSS peak {ratios['rss_peak_ratio']:.4f}, step time {ratios['step_time_ratio']:.3f}x interleaved median, "
        f"{ratios['step_time_ratio_min']:.3f}x min (goal <= 1.1)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker")}}
        payload.update({"chunked": chunked, "dense": dense, "interleaved_step_s": inter})
        payload.update({"ratios": ratios, "logits_bytes": logits_bytes})
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
