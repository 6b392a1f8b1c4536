#!/usr/bin/env bash
# GPU check of the demo's draft (gamma 2, 1500 steps) on the tiny teacher: bf16 then float32, 20 held-out prompts.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/gpu.txt
python3 -c "import sys, torch, transformers, tokenizers; print(sys.version.split()[0], torch.__version__, transformers.__version__, tokenizers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a $OUT/gpu.txt
B="python3 scripts/dflash_benchmark.py --target runs/gpu/teacher --draft runs/gpu/draft --prompts-file runs/gpu/prompts.jsonl --num-prompts 20 --max-new-tokens 128 --block-size 8 --repeats 3 --out-dir $OUT"
start=$SECONDS
timeout 260 $B --dtype bfloat16 --report-name gpu_bfloat16_20${TAG:-} 2>&1 | grep -v "prompts x repeats" | tee $OUT/bf16.log
echo "bf16 rc=$? $((SECONDS-start))s" | tee -a $OUT/gpu.txt
timeout 260 $B --dtype float32 --report-name gpu_float32_20${TAG:-} 2>&1 | grep -v "prompts x repeats" | tee $OUT/f32.log
echo "f32 rc=$? $((SECONDS-start))s" | tee -a $OUT/gpu.txt
