#!/usr/bin/env python
"""Close an end-to-end run: print one table, write <name>_pipeline.json and <name>_training.png.

Reads what the steps wrote: the benchmark JSON (scripts/dflash_benchmark.py) and the trainer's
--summary-json (per-step loss and accepted length), plus the wall time of each step.

Example:
  python scripts/pipeline_report.py --bench-json artifacts/dflash_bench/tiny_pipeline.json \\
      --train-summary runs/demo/train_summary.json --timing data=21 --timing cache=60 --timing train=480
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _timing(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        return name, float(value) if sep and name else float("x")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not STEP=SECONDS (e.g. train=480)") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-json", required=True, help="the benchmark's JSON report.")
    p.add_argument("--train-summary", required=True, help="the trainer's --summary-json file.")
    p.add_argument("--timing", type=_timing, action="append", default=[],
                   help="STEP=SECONDS wall time of one step, repeatable, in pipeline order.")
    p.add_argument("--out-dir", default=None, help="where the JSON and PNG go (default: beside --bench-json).")
    p.add_argument("--name", default=None, help="file stem (default: the --bench-json stem).")
    args = p.parse_args(argv)
    from dflash_gptoss.benchmark.pipeline_report import summary_table, write_pipeline_report

    bench = Path(args.bench_json)
    for path in (bench, Path(args.train_summary)):
        if not path.is_file():
            p.error(f"{path} does not exist")
    try:
        summary, paths = write_pipeline_report(bench, args.train_summary, dict(args.timing),
                                               args.out_dir or bench.parent, args.name or bench.stem)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_table(summary)))
    print("wrote " + " and ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
