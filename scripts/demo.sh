#!/usr/bin/env bash
# The main job on the embedded default, on CPU: set up .venv, build (or reuse) the tiny
# GPT-OSS teacher, then benchmark DFlash speculative decoding against the KV-cache greedy
# loop with the two diagnostic drafts: 'random' (an untrained draft: the floor) and
# 'oracle' (the target's own continuation: the ceiling). Writes artifacts/dflash_bench/.
# Figures printed here are the TINY teacher's, on this machine's CPU.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup_env.sh"
cd "$REPO"
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
$PY scripts/build_tiny_teacher.py
for draft in random oracle; do
  echo
  echo "=== benchmark: tiny teacher, draft=$draft ==="
  $PY scripts/dflash_benchmark.py --target tiny --draft "$draft" --num-prompts 20 --max-new-tokens 128 --block-size 8 "$@"
done
