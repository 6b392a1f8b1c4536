"""Build (or reuse) the embedded tiny GPT-OSS teacher and print where it is.

The snapshot is an ordinary Hugging Face folder that every other script takes
as ``--model-snapshot-dir``. It is cached per machine, so running this twice
builds once; the library call behind it is
:func:`dflash_gptoss.tiny_teacher.ensure_tiny_teacher`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dflash_gptoss.tiny_teacher import ensure_tiny_teacher, load_report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out-root",
        type=Path,
        default=None,
        help="cache root; the snapshot goes to <out-root>/tiny_teacher/<fingerprint>/ "
        "(default: $DFLASH_GPTOSS_CACHE, else ~/.cache/dflash_gptoss)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for weight init and data order; a different seed is a different snapshot (default: 0)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if a complete snapshot for this spec and seed already exists",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    snapshot = ensure_tiny_teacher(args.out_root, seed=args.seed, force=args.force)
    print(snapshot)
    print(json.dumps(load_report(snapshot), indent=2))


if __name__ == "__main__":
    main()
