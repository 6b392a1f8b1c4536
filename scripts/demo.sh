#!/usr/bin/env bash
# The main job, end to end, on the embedded default (tiny GPT-OSS teacher) on this CPU, with the
# same scripts and flags a user runs on the real model:
#   tiny teacher (built or reused) -> teacher greedy data (train prompts, and held-out prompts for
#   evaluation) -> teacher caches (2x2 JAX mesh) -> draft training (easydel Trainer, 2x2 mesh, held-out
#   accepted length every 200 steps, the best step kept) -> export (checked against the JAX draft)
#   -> benchmark on held-out prompts -> one table + artifacts/dflash_bench/tiny_pipeline_<UTC>*.{json,png}
# Work files go to $DEMO_DIR (default runs/demo): data and caches in a folder named after their settings,
# reused when they already match; checkpoints and the exported draft beside them, trained afresh.
# Every figure printed here is the TINY teacher's, on this machine's CPU, not gpt-oss-20b's.
# Extra arguments go to the trainer (e.g. --max-training-steps 400 for a quick look).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=cpu
# A real dp=2 x tp=2 mesh on CPU (batch sharded on dp, lm_head on tp). The tests use 2x4; here 4 host
# devices, because on a 2-core machine 8 of them cost ~20% more per training step, and the demo keeps
# to 20 minutes (artifacts/dflash_bench/tiny_acceptance/README.md, "2026-11-25 evening: the 20-minute budget").
export XLA_FLAGS="--xla_force_host_platform_device_count=4"
PY=.venv/bin/python
DEMO_DIR="${DEMO_DIR:-$REPO/runs/demo}"
# Data and caches live in a folder named after their settings: a demo whose recipe changed builds
# new ones instead of meeting files of the old recipe (which the scripts refuse, rightly).
WORK="$DEMO_DIR/data_1024x128_ctx256_dp2xtp2"
NAME="tiny_pipeline_$(date -u +%Y%m%d_%H%M%S)"
mkdir -p "$DEMO_DIR" "$WORK"
TIMINGS=()
step() {  # step NAME CMD...: run one pipeline step, print and keep its wall time
  local name=$1 start=$SECONDS
  shift
  echo
  echo "=== $name ==="
  "$@"
  TIMINGS+=(--timing "$name=$((SECONDS - start))")
}

step setup bash scripts/setup_env.sh
step teacher $PY scripts/build_tiny_teacher.py
TEACHER="$($PY -c 'from dflash_gptoss.tiny_teacher import ensure_tiny_teacher; print(ensure_tiny_teacher(progress=False))')"

step data $PY scripts/generate_teacher_data.py --model-snapshot-dir "$TEACHER" --out "$WORK/greedy.jsonl" \
  --num-samples 1024 --prompt-tokens 64 --max-new-tokens 128 --batch-size 128 --resume

# Held-out data: prompts from the held-out split (files the teacher and the draft never train on; seed 1,
# so not the benchmark's own 20 prompts), continued by the teacher: the evaluation cache.
step heldout-data $PY scripts/generate_teacher_data.py --model-snapshot-dir "$TEACHER" --out "$WORK/heldout.jsonl" \
  --split heldout --seed 1 --num-samples 128 --prompt-tokens 64 --max-new-tokens 128 --batch-size 128 --resume

step cache $PY scripts/tpu_dflash_build_teacher_cache.py --model-snapshot-dir "$TEACHER" \
  --data "$WORK/greedy.jsonl" --layout windows --ctx-len 256 --block-size 8 --num-context-features 3 \
  --num-blocks 1024 --batch-size 16 --dp 2 --tp 2 --out-dir "$WORK/cache" --resume

step heldout-cache $PY scripts/tpu_dflash_build_teacher_cache.py --model-snapshot-dir "$TEACHER" \
  --data "$WORK/heldout.jsonl" --layout windows --ctx-len 256 --block-size 8 --num-context-features 3 \
  --num-blocks 32 --batch-size 16 --dp 2 --tp 2 --out-dir "$WORK/heldout_cache" --resume

rm -rf "$DEMO_DIR/checkpoints" "$DEMO_DIR/draft"
# Loss decay gamma 2 (the trainer's default for block 8 is the published 4): on the held-out curve it reaches
# the same accepted length in fewer steps (artifacts/dflash_bench/tiny_acceptance/README.md, "2026-11-26: a
# faster attention, the loss decay, a fourth layer"). 600 steps: what fits the 20-minute budget on a 2-core
# machine, where everything else takes ~15 minutes (same README, "2026-11-26: what fits in 20 minutes today":
# 4.50 on the 20 prompts). `bash scripts/demo.sh --max-training-steps 1500` trains the draft nearest 5.0
# measured here (4.97 / 5 / 8, gamma 2 and 1500 steps), in ~24 minutes.
step train $PY scripts/tpu_dflash_train_with_easydel_trainer.py --cache-dir "$WORK/cache" \
  --teacher-snapshot-dir "$TEACHER" --save-directory "$DEMO_DIR/checkpoints" --model-name tiny-dflash \
  --dp 2 --tp 2 --total-batch-size 16 --anchors-per-window 16 --num-draft-layers 3 \
  --max-training-steps 600 --learning-rate 1e-2 --lr-schedule cosine --warmup-steps 50 --loss-decay-gamma 2 \
  --vocab-chunk-size 1024 --log-steps 50 --save-steps 400 \
  --eval-cache-dir "$WORK/heldout_cache" --eval-steps 200 --keep-best \
  --export-dir "$DEMO_DIR/draft" --summary-json "$DEMO_DIR/train_summary.json" "$@"

# Two interleaved repeats (the CPU default is 3): ~40 s less, which the 20-minute budget needs on a 2-core machine
# (acceptance notes, "2026-11-26: what fits in 20 minutes today"); the acceptance and the lossless check do not
# depend on the repeats.
step benchmark $PY scripts/dflash_benchmark.py --target "$TEACHER" --draft "$DEMO_DIR/draft" \
  --num-prompts 20 --prompt-tokens 64 --max-new-tokens 128 --block-size 8 --repeats 2 --report-name "$NAME"

echo
echo "=== summary: tiny teacher, $NAME ==="
$PY scripts/pipeline_report.py --bench-json "artifacts/dflash_bench/$NAME.json" \
  --train-summary "$DEMO_DIR/train_summary.json" "${TIMINGS[@]}"
