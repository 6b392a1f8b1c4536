"""Run one command and report its wall time and peak resident memory (for benchmark scripts).

``python -m dflash_gptoss.benchmark.measure_step --name cache --log steps.jsonl -- python scripts/...`` runs
the command, passes its exit code through, prints ``[measure] cache: 123.4 s wall, peak RSS 5.67 GB``
and appends the same as one JSON line to ``--log``. Peak RSS is the kernel's ``ru_maxrss`` of the
child processes (the largest one, not a sum), so it reads the same on any Linux machine without
``/usr/bin/time``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="step name to report.")
    p.add_argument("--log", default=None, help="append {name, seconds, peak_rss_bytes, returncode} here (JSONL).")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run.")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command to run after --")
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    print(f"[measure] {args.name}: {seconds:.1f} s wall, peak RSS {peak / 1e9:.2f} GB"
          + (f", exit code {rc}" if rc else ""), flush=True)
    if args.log:
        with Path(args.log).open("a") as f:
            f.write(json.dumps({"name": args.name, "seconds": round(seconds, 2), "peak_rss_bytes": peak,
                                "returncode": rc}) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
