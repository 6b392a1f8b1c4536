#!/usr/bin/env bash
# T=0 vs T=1 on the demo's draft (tiny teacher, this CPU): 20 held-out prompts, 128 new tokens, block 8,
# two rounds of (greedy, T=1 argmax proposals, T=1 sampled proposals), each run 2 interleaved repeats;
# then the demo's training command again with --eval-temperature 1.0 (the same draft: training is
# deterministic at a fixed mesh and seed), for the held-out expected accepted length at T=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=cpu
OUT=artifacts/dflash_bench/sampling_tiny
DEMO=${DEMO_DIR:-runs/demo}
TEACHER="$(.venv/bin/python -c 'from dflash_gptoss.tiny_teacher import ensure_tiny_teacher; print(ensure_tiny_teacher(progress=False))')"
B=".venv/bin/python scripts/dflash_benchmark.py --target $TEACHER --draft $DEMO/draft --num-prompts 20 --prompt-tokens 64 \
  --max-new-tokens 128 --block-size 8 --repeats 2 --seed 0 --out-dir $OUT"
for round in 1 2; do
  $B --report-name T0_round$round 2>&1 | grep -v "prompts x repeats" | tail -14
  $B --temperature 1.0 --draft-sample greedy --report-name T1_greedy_round$round 2>&1 | grep -v "prompts x repeats" | tail -14
  $B --temperature 1.0 --draft-sample sample --report-name T1_sample_round$round 2>&1 | grep -v "prompts x repeats" | tail -14
done
WORK="$DEMO/data_1024x128_ctx256_dp2xtp2"
rm -rf "$DEMO/checkpoints_T1" "$DEMO/draft_T1"
XLA_FLAGS=--xla_force_host_platform_device_count=4 .venv/bin/python scripts/tpu_dflash_train_with_easydel_trainer.py \
  --cache-dir "$WORK/cache" --teacher-snapshot-dir "$TEACHER" --save-directory "$DEMO/checkpoints_T1" --model-name tiny-dflash \
  --dp 2 --tp 2 --total-batch-size 16 --anchors-per-window 16 --num-draft-layers 3 \
  --max-training-steps 600 --learning-rate 1e-2 --lr-schedule cosine --warmup-steps 50 --loss-decay-gamma 2 \
  --vocab-chunk-size 1024 --log-steps 50 --save-steps 400 \
  --eval-cache-dir "$WORK/heldout_cache" --eval-steps 200 --keep-best --eval-temperature 1.0 \
  --export-dir "$DEMO/draft_T1" --summary-json "$OUT/train_summary_eval_T1.json" 2>&1 | grep -E "^steps|^held-out|^export check"
sha256sum "$DEMO/draft/model.safetensors" "$DEMO/draft_T1/model.safetensors"
