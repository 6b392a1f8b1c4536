#!/usr/bin/env python
"""Write a random-weight GPT-OSS snapshot with gpt-oss-20b's exact widths (fewer layers and experts).

Thin CLI over :mod:`dflash_gptoss.planning.real_width_snapshot`; scripts/rehearse_real_widths.sh runs the
real pipeline on it. ~2.5 GB on disk at the defaults (embedding and lm_head are 201088 x 2880 bf16).
"""

from __future__ import annotations

import argparse
import sys

from dflash_gptoss.cli_types import positive_int


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="snapshot folder to write (replaced if it exists).")
    p.add_argument("--num-layers", type=positive_int, default=7,
                   help="decoder layers (7: the fewest the layer-id rule allows for 4 context features).")
    p.add_argument("--num-experts", type=positive_int, default=4, help="experts per layer (>= 4, the top-k).")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights.")
    p.add_argument("--tokenizer-dir", default=None,
                   help="folder with tokenizer.json to copy (default: the embedded tiny teacher's).")
    args = p.parse_args(argv)
    from dflash_gptoss.planning.real_width_snapshot import real_width_config, write_real_width_snapshot

    try:
        real_width_config(args.num_layers, args.num_experts)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tok = args.tokenizer_dir
    if tok is None:
        from dflash_gptoss.tiny_teacher import ensure_tiny_teacher

        tok = ensure_tiny_teacher(progress=True)
    out = write_real_width_snapshot(args.out, tokenizer_dir=tok, num_layers=args.num_layers,
                                    num_experts=args.num_experts, seed=args.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
