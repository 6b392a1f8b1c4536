#!/usr/bin/env python
"""What the cache builder's finiteness check costs: its jitted teacher forward with and without the check.

The build's forward returns, beside the features and labels, each row's and layer's non-finite count, sum and
sum of squares (``teacher_jax.teacher_forward_fn``). This times that forward against the same forward without
the reduction, interleaved (alternating which goes first), on the demo's chunk: batch 16 x ctx 256, K=3
layers of the tiny teacher, dp 2 x tp 2 on 4 host devices, float32. It prints both medians and the
median, IQR and half-by-half medians of the per-pair ratio; and the trainer's per-step check (two device
scalars read on the host). Figures are the tiny teacher's on this machine's CPU.

  python scripts/bench_finite_checks.py --pairs 40
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=40, help="interleaved (with, without) pairs to time (default 40).")
    args = p.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dflash_gptoss.teacher_easydel_fixes import decoder_forward
    from dflash_gptoss.teacher_jax import JaxTeacher
    from dflash_gptoss.tiny_teacher import ensure_tiny_teacher

    layers = (1, 2, 3)
    teacher = JaxTeacher(ensure_tiny_teacher(progress=False), list(layers), dp=2, tp=2)
    graphdef, state = nnx.split(teacher.model)

    def plain(state, ids):
        feats, logits = decoder_forward(nnx.merge(graphdef, state), ids, layers)
        return (jnp.concatenate([f.astype(jnp.float32) for f in feats], axis=-1),
                jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32))

    plain = jax.jit(plain)
    ids = jax.device_put(np.random.default_rng(0).integers(0, 4096, (16, 256)).astype(np.int32),
                         teacher._in_sharding)
    fns = {"with the check": lambda: jax.block_until_ready(teacher._fwd(state, ids)),
           "without": lambda: jax.block_until_ready(plain(state, ids))}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with teacher.mesh:
        for f in fns.values():
            f()
            f()
        for r in range(args.pairs):
            for k, f in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"{k}: median {statistics.median(v) * 1e3:.1f} ms")
    ratios = [a / b for a, b in zip(times["with the check"], times["without"], strict=True)]
    half = len(ratios) // 2
    print(f"ratio with/without: median {statistics.median(ratios):.4f}, IQR {np.percentile(ratios, 25):.3f}-"
          f"{np.percentile(ratios, 75):.3f} over {len(ratios)} interleaved pairs; half medians "
          f"{statistics.median(ratios[:half]):.4f} / {statistics.median(ratios[half:]):.4f}")
    loss, grad_norm = jnp.float32(1.5), jnp.float32(0.3)
    t0 = time.perf_counter()
    for _ in range(1000):
        [v for v in (loss, grad_norm) if not math.isfinite(float(v))]
    print(f"trainer check: {(time.perf_counter() - t0) / 1000 * 1e6:.1f} us per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
