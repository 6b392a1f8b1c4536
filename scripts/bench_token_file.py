#!/usr/bin/env python
"""The token file at scale: tokenize a synthetic JSONL once, then read random windows from it.

Writes a JSONL of ``--tokens`` synthetic token ids (documents of ``--doc-tokens`` ids each, a
quarter of each a prompt), then runs two child processes, so each phase's peak RSS is its own
(the kernel's high-water mark is per process): ``tokenize`` (the first ``load_token_stream``,
which validates every record and streams the token file) and ``read`` (a later start: the JSONL's
checksum and the manifest checked, the arrays memory-mapped, then ``--windows`` random windows of
``--ctx-len`` tokens read in batches of ``--batch``, as a trainer's data loader would). Prints one
line per phase and, with ``--json``, writes the figures. No model is involved; figures are this
machine's.

  python scripts/bench_token_file.py --tokens 50000000 --json artifacts/token_file/bench_50M.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOCAB = 201088
CFG = {"vocab_size": VOCAB, "eos_token_id": 200002}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def write_jsonl(path: Path, tokens: int, doc_tokens: int, seed: int) -> int:
    """Synthetic ``input_ids`` records totalling at least ``tokens`` ids; returns the file's bytes."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(-(-tokens // doc_tokens)):
            ids = rng.integers(0, 200000, size=doc_tokens)
            f.write(json.dumps({"input_ids": ids.tolist(), "prompt_len": doc_tokens // 4}) + "\n")
    return path.stat().st_size


def phase_tokenize(data: Path) -> dict:
    from dflash_gptoss.cache_input import load_token_stream

    t0 = time.perf_counter()
    tokens, _ = load_token_stream(data, data.parent, CFG)
    return {"seconds": time.perf_counter() - t0, "tokens": int(tokens.size), "peak_rss_bytes": _peak_rss()}


def phase_read(data: Path, ctx_len: int, windows: int, batch: int, seed: int) -> dict:
    from dflash_gptoss.cache_input import load_token_stream

    t0 = time.perf_counter()
    tokens, response = load_token_stream(data, data.parent, CFG)
    opened = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    t1, total = time.perf_counter(), 0
    for _ in range(windows // batch):
        starts = rng.integers(0, tokens.size - ctx_len + 1, size=batch)
        index = starts[:, None] + np.arange(ctx_len)[None, :]
        ids, flags = tokens[index], response[index]
        total += int(ids[:, -1].sum() + flags[:, 0].sum())  # touch the data
    seconds = time.perf_counter() - t1
    return {"open_seconds": opened, "windows": windows // batch * batch, "read_seconds": seconds,
            "windows_per_second": windows // batch * batch / seconds, "peak_rss_bytes": _peak_rss(), "check": total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=50_000_000, help="synthetic tokens in the JSONL.")
    p.add_argument("--doc-tokens", type=int, default=3072, help="tokens per synthetic document.")
    p.add_argument("--ctx-len", type=int, default=4096, help="window length the reader reads.")
    p.add_argument("--windows", type=int, default=20000, help="random windows to read.")
    p.add_argument("--batch", type=int, default=64, help="windows per read (one training step's rows).")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the window starts.")
    p.add_argument("--work-dir", default=None, help="where the JSONL and its token file go (default: a temp dir).")
    p.add_argument("--json", default=None, help="also write the figures here.")
    p.add_argument("--phase", choices=("tokenize", "read"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:  # a child: one phase, its figures as JSON on stdout
        data = Path(args.data)
        out = phase_tokenize(data) if args.phase == "tokenize" else phase_read(data, args.ctx_len, args.windows,
                                                                              args.batch, args.seed)
        print(json.dumps(out))
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_token_file_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "synthetic.jsonl"
    t0 = time.perf_counter()
    jsonl_bytes = write_jsonl(data, args.tokens, args.doc_tokens, args.seed)
    print(f"synthetic JSONL: {jsonl_bytes / 1e6:.0f} MB, {time.perf_counter() - t0:.0f} s to write", flush=True)
    figures = {"settings": {k: v for k, v in vars(args).items() if k not in ("phase", "data", "json")},
               "jsonl_bytes": jsonl_bytes, "machine": f"{os.cpu_count()} CPUs"}
    for phase in ("tokenize", "read"):
        cmd = [sys.executable, __file__, "--phase", phase, "--data", str(data), "--ctx-len", str(args.ctx_len),
               "--windows", str(args.windows), "--batch", str(args.batch), "--seed", str(args.seed)]
        figures[phase] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    tok, rd = figures["tokenize"], figures["read"]
    print(f"tokenize: {tok['tokens']:,} tokens in {tok['seconds']:.0f} s ({tok['tokens'] / tok['seconds'] / 1e6:.2f}M "
          f"tokens/s), peak RSS {tok['peak_rss_bytes'] / 1e9:.2f} GB")
    print(f"read: opened in {rd['open_seconds']:.1f} s; {rd['windows']} windows of {args.ctx_len} in "
          f"{rd['read_seconds']:.1f} s = {rd['windows_per_second']:.0f} windows/s, peak RSS "
          f"{rd['peak_rss_bytes'] / 1e9:.2f} GB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
