#!/usr/bin/env python
"""Check a teacher cache or a training checkpoint against its manifest, every byte (sha256).

Opening a cache for training checks only each file's size when the cache is larger than 4 GiB (a full
check of a ~100 GB gpt-oss-20b cache takes over a minute); this command does the full check on demand,
e.g. after copying a cache to the training machine. A checkpoint is always checked fully when it is
resumed or exported. Prints one line per folder; exit code 0 when every folder is intact, 1 otherwise.

Examples:
  python scripts/dflash_verify.py /dev/shm/dflash_cache/gptoss20b_ctx4096_b8_k4
  python scripts/dflash_verify.py /dev/shm/easydel-checkpoints/gptoss20b-dflash-draft/run-2000
  python scripts/dflash_verify.py --check size runs/demo/cache runs/demo/checkpoints/tiny-dflash/run-*
"""

from __future__ import annotations

import argparse
import sys
import time

from dflash_gptoss.cache_format import human_bytes
from dflash_gptoss.run_safety.integrity import CHECKS, IntegrityError, read_manifest, verify_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="teacher cache folders and/or run-<step> checkpoint folders.")
    p.add_argument("--check", choices=CHECKS, default="full",
                   help="'full' re-hashes every byte (default); 'size' only checks every file's presence and size.")
    p.add_argument("--no-progress", action="store_true", help="no progress bar.")
    args = p.parse_args(argv)
    bad = 0
    for folder in args.folders:
        t0 = time.perf_counter()
        try:
            kind = read_manifest(folder, what="folder").get("kind", "folder")
            manifest = verify_manifest(folder, what=kind, check=args.check, progress=not args.no_progress)
        except IntegrityError as e:
            print(f"DAMAGED {folder}: {e}")
            bad += 1
            continue
        print(f"ok {folder}: {kind}, {len(manifest['files'])} files, {human_bytes(manifest.get('total_bytes', 0))} "
              f"({args.check} check, {time.perf_counter() - t0:.1f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
