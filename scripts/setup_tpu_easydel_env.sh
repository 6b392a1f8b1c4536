#!/usr/bin/env bash
# Create (or refresh) .venv-easydel: the JAX/EasyDeL environment that runs the teacher cache
# builder and the draft trainer on a TPU VM (scripts/tpu_dflash_build_teacher_cache.py,
# scripts/tpu_dflash_train_with_easydel_trainer.py).
#
# Why a second environment next to .venv (scripts/setup_env.sh): a TPU host needs jax[tpu]
# (libtpu) and nothing of the GPU/benchmark side, and it should not pull CUDA torch wheels
# (several GB) only to read safetensors and write the exported draft; a CPU torch wheel does that.
#
# What it installs: torch (CPU wheel, from the PyTorch CPU index, else the default index), then
# jax[tpu] (plain jax with --cpu) with the version range of pyproject's `jax` extra, and this
# package in editable mode with its `jax` and `torch` extras (easydel, flax, optax, transformers,
# safetensors), all in one resolver run so that the pins agree.
#
# Idempotent: a stamp inside the venv records sha256(pyproject.toml + this script + mode); when it
# matches, the script says "up to date" and exits 0. --force reinstalls anyway.
#
# Multi-host TPU pods (v4-32, v5p-64, ...): every host runs its own Python process, so every
# host needs the same environment at the same path. Run this script on ALL workers at once:
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command="cd ~/dflash-gptoss && bash scripts/setup_tpu_easydel_env.sh"
# (on a pod, jax.devices() only answers once every host has started JAX; the device check at the
# end therefore has a time limit, and --skip-device-check leaves it out).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/scripts/$(basename "${BASH_SOURCE[0]}")"
PYTORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
DEVICE_CHECK_TIMEOUT_S="${DEVICE_CHECK_TIMEOUT_S:-120}"

usage() {
  cat <<EOF
usage: bash scripts/setup_tpu_easydel_env.sh [--cpu] [--python PY] [--venv DIR] [--force] [--skip-device-check]

Create or refresh the JAX/EasyDeL virtual environment for the TPU cache builder and trainer.

options:
  --cpu                install plain jax (CPU) instead of jax[tpu]: for machines without a TPU
  --python PY          interpreter for the venv, Python >= 3.11 (default: \$PYTHON or python3)
  --venv DIR           where to create the venv (default: \$VENV_DIR or <repo>/.venv-easydel)
  --force              reinstall even when the stamp says the venv is up to date
  --skip-device-check  do not start JAX at the end to count devices
  -h, --help           show this help and exit

environment: PYTHON, VENV_DIR, DEVICE_CHECK_TIMEOUT_S (default 120) mean the same as the flags.
On a multi-host TPU pod, run it on every host:
  gcloud compute tpus tpu-vm ssh \$TPU_NAME --zone \$ZONE --worker=all \\
    --command="cd ~/dflash-gptoss && bash scripts/setup_tpu_easydel_env.sh"
EOF
}

PYTHON="${PYTHON:-python3}"
VENV="${VENV_DIR:-$REPO/.venv-easydel}"
MODE="tpu"
FORCE=0
DEVICE_CHECK=1
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cpu) MODE="cpu" ;;
    --python) [ $# -ge 2 ] || { echo "error: --python needs a value" >&2; exit 2; }; PYTHON="$2"; shift ;;
    --python=*) PYTHON="${1#*=}" ;;
    --venv) [ $# -ge 2 ] || { echo "error: --venv needs a value" >&2; exit 2; }; VENV="$2"; shift ;;
    --venv=*) VENV="${1#*=}" ;;
    --force) FORCE=1 ;;
    --skip-device-check) DEVICE_CHECK=0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { echo "[setup-tpu] $*"; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: interpreter '$PYTHON' not found; pass --python python3.11 (or set PYTHON=...)." >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: $PYTHON is $("$PYTHON" --version 2>&1); this project needs Python >= 3.11." >&2
  echo "       TPU VM images often ship 3.10: install python3.11 and python3.11-venv, then pass --python python3.11." >&2
  exit 2
fi

# The stamp covers what decides the install: the dependency pins, this script, and the mode.
want="$(cat "$REPO/pyproject.toml" "$SELF" | sha256sum | cut -d' ' -f1) mode=$MODE"
stamp="$VENV/.dflash_gptoss_easydel_installed"
if [ "$FORCE" = 0 ] && [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  log "$VENV is up to date (mode $MODE); pass --force to reinstall"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "step 1/5: creating virtual environment $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
  if ! "$PYTHON" -m venv "$VENV"; then
    echo "error: '$PYTHON -m venv' failed; on Debian/Ubuntu install the matching python3.X-venv package." >&2
    exit 2
  fi
else
  log "step 1/5: reusing virtual environment $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
PY="$VENV/bin/python"
rm -f "$stamp"  # an interrupted install below must not leave a stamp that claims success

log "step 2/5: upgrading pip"
"$PY" -m pip install -q --upgrade pip

# Requirement strings come from pyproject.toml so that this script never drifts from its pins.
read_extra() {  # read_extra EXTRA PACKAGE -> the requirement of PACKAGE in pyproject's EXTRA
  "$PY" - "$REPO/pyproject.toml" "$1" "$2" <<'EOF'
import re
import sys
import tomllib

path, extra, package = sys.argv[1:]
with open(path, "rb") as f:
    requirements = tomllib.load(f)["project"]["optional-dependencies"][extra]
for requirement in requirements:
    if re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0] == package:
        print(requirement)
        break
else:
    sys.exit(f"pyproject.toml: no '{package}' in the '{extra}' extra")
EOF
}
jax_req="$(read_extra jax jax)"
torch_req="$(read_extra torch torch)"
if [ "$MODE" = tpu ]; then
  jax_install="${jax_req/#jax/jax[tpu]}"
else
  jax_install="$jax_req"
fi

if "$PY" -c 'import torch' 2>/dev/null; then
  log "step 3/5: torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
else
  log "step 3/5: installing $torch_req (CPU wheel: the JAX side only reads safetensors and exports with it)"
  if ! "$PY" -m pip install -q --retries 2 --timeout 60 --index-url "$PYTORCH_CPU_INDEX" "$torch_req"; then
    log "the PyTorch CPU index failed; installing $torch_req from the default index instead"
    "$PY" -m pip install -q "$torch_req"
  fi
fi

log "step 4/5: installing $jax_install and dflash_gptoss[jax,torch] (editable; a few minutes the first time)"
"$PY" -m pip install -q "$jax_install" -e "$REPO[jax,torch]"

log "step 5/5: checking the environment"
"$PY" - <<'EOF'
import sys

import easydel
import flax
import jax
import torch
import transformers

print(f"[setup-tpu] python {sys.version.split()[0]}, jax {jax.__version__}, flax {flax.__version__}, "
      f"easydel {easydel.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
EOF
echo "$want" > "$stamp"  # written only once everything imports
if [ "$DEVICE_CHECK" = 1 ]; then
  # Starting JAX can block on a pod slice until every host has started it, so it gets a time
  # limit; a failure here is reported, never fatal: the install itself is done.
  if devices="$(timeout "$DEVICE_CHECK_TIMEOUT_S" "$PY" -c \
      'import jax; print(jax.default_backend(), jax.device_count(), jax.local_device_count())' 2>/dev/null)"; then
    read -r backend count local_count <<<"$(echo "$devices" | tail -1)"
    log "jax backend $backend: jax.devices() has $count device(s), $local_count on this host"
    if [ "$MODE" = tpu ] && [ "$backend" != tpu ]; then
      log "NOTE: no TPU visible here (backend $backend). Expected off a TPU VM; on a TPU VM check that no other"
      log "      process holds the TPU (libtpu allows one) and that libtpu installed."
    fi
  else
    log "NOTE: could not list JAX devices within ${DEVICE_CHECK_TIMEOUT_S}s. On a multi-host pod this is expected"
    log "      unless every host runs JAX at the same time; otherwise another process may hold the TPU."
  fi
else
  log "device check skipped (--skip-device-check)"
fi
log "done: source $VENV/bin/activate"
