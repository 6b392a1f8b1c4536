#!/usr/bin/env bash
# Rehearse the real pipeline at gpt-oss-20b's exact widths on this CPU, with the real scripts:
#   random-weight snapshot (hidden 2880, vocab 201088, 64/8 heads of dim 64, window 128, YaRN, sinks,
#   MXFP4 experts under the real tensor names; 7 layers, 4 experts) -> teacher greedy data
#   -> teacher cache (windows, ctx 512, K=4: the real 23 KB per position) on a dp=1 x tp=8 mesh (the 8 CPU
#      "devices" share this host's memory: at dp=2 each holds a replica's shard, two copies of the 8 GB float32
#      teacher, and the build was killed for memory at 24 GB on a 24 GiB machine)
#   -> a few training steps with the real vocabulary (exact chunked CE over 201088) -> export
#   -> the DFlash benchmark for a few tokens.
# Each step prints its wall time and peak RSS ([measure] lines) and the end prints them all; they land
# in $REH_DIR/steps.jsonl. A benchmark, not a test: the weights are random, so acceptance means nothing;
# what it shows is that every program runs at the real widths, and what each step costs in time and
# host memory. Last run: see artifacts/tpu_plan/README.md ("Rehearsal at the real widths (CPU, random weights)";
# ~35 min on a shared 2-core CPU).
# Needs ~3 GB of disk for the snapshot and ~22 GB of RAM at its peak (measured: the cache build and the
# training step). Work files go to $REH_DIR (default runs/rehearsal); the snapshot and the teacher data
# are reused when they exist (REH_FRESH=1 rewrites them).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=8"  # a real dp=2 x tp=4 mesh on CPU
PY=.venv/bin/python
REH_DIR="${REH_DIR:-$REPO/runs/rehearsal}"
SNAP="$REH_DIR/snapshot"
LOG="$REH_DIR/steps.jsonl"
mkdir -p "$REH_DIR"
rm -f "$LOG"
step() {  # step NAME CMD...: run one step under dflash_gptoss.benchmark.measure_step (wall time, peak RSS)
  local name=$1
  shift
  echo
  echo "=== $name ==="
  $PY -m dflash_gptoss.benchmark.measure_step --name "$name" --log "$LOG" -- "$@"
}

[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup_env.sh  # SKIP_SETUP=1: use the .venv as it is
if [ ! -f "$SNAP/config.json" ] || [ "${REH_FRESH:-0}" = 1 ]; then
  step snapshot $PY scripts/make_real_width_snapshot.py --out "$SNAP" --num-layers 7 --num-experts 4
fi

if [ ! -f "$REH_DIR/greedy.jsonl" ] || [ "${REH_FRESH:-0}" = 1 ]; then  # reused like the snapshot
  step data $PY scripts/generate_teacher_data.py --model-snapshot-dir "$SNAP" --out "$REH_DIR/greedy.jsonl" \
    --num-samples 8 --prompt-tokens 64 --max-new-tokens 64 --batch-size 8 --dtype float32 --overwrite
fi

step cache $PY scripts/tpu_dflash_build_teacher_cache.py --model-snapshot-dir "$SNAP" \
  --data "$REH_DIR/greedy.jsonl" --layout windows --ctx-len 512 --block-size 8 --num-context-features 4 \
  --num-blocks 8 --batch-size 8 --dp 1 --tp 8 --out-dir "$REH_DIR/cache" --overwrite

rm -rf "$REH_DIR/checkpoints" "$REH_DIR/draft"
step train $PY scripts/tpu_dflash_train_with_easydel_trainer.py --cache-dir "$REH_DIR/cache" \
  --teacher-snapshot-dir "$SNAP" --save-directory "$REH_DIR/checkpoints" --model-name rehearsal \
  --dp 2 --tp 4 --total-batch-size 4 --anchors-per-window 8 --num-draft-layers 1 \
  --max-training-steps 3 --vocab-chunk-size 8192 --log-steps 1 --export-check-blocks 32 \
  --export-dir "$REH_DIR/draft" --summary-json "$REH_DIR/train_summary.json"

step benchmark $PY scripts/dflash_benchmark.py --target "$SNAP" --draft "$REH_DIR/draft" \
  --num-prompts 2 --prompt-tokens 32 --max-new-tokens 16 --block-size 8 --device cpu --dtype float32 \
  --out-dir "$REH_DIR/bench" --report-name rehearsal

echo
echo "=== rehearsal at gpt-oss-20b widths (random weights, this CPU): wall time and peak RSS per step ==="
$PY - "$LOG" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"{r['name']:<10} {r['seconds']:>8.1f} s   peak RSS {r['peak_rss_bytes'] / 1e9:6.2f} GB")
print(f"{'total':<10} {sum(r['seconds'] for r in rows):>8.1f} s")
EOF
