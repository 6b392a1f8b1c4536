#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment .venv inside the repo, idempotently.
#
# Installs the package in editable mode with every extra (torch side, JAX/EasyDeL side, libtpu
# for the TPU planner, Modal, dev tools) into ONE environment: easydel 0.3.0 pins transformers~=5.5 and
# flax==0.12.3, and the torch side uses the same transformers.
# Torch: when this machine's pip offers a torch wheel locally (its find-links, e.g. a CPU
# build), that one is used; otherwise pip installs torch the normal way from the index.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
# DFLASH_INSTALLER=pip: install with pip only (uv is tried first otherwise).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DFLASH_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: $PYTHON is $("$PYTHON" --version 2>&1); this project needs Python >= 3.11 (set PYTHON=...)." >&2
  exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.dflash_gptoss_installed"
want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if "$VENV/bin/pip" install -q --no-index --no-deps torch 2>/dev/null; then
    # --no-deps: torch's own dependencies (typing_extensions, ...) arrive with the package below, so
    # torch cannot be imported yet; read its version from the installed metadata instead.
    echo "[setup] torch: installed the wheel this machine offers locally ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))'))"
  else
    echo "[setup] torch: no local wheel offered; installing from the package index"
  fi
fi
SPEC="$REPO[torch,jax,tpu-plan,modal,dev]"
# uv installs the same versions as pip (checked: identical `pip list`) in ~30 s instead of ~3 min
# on a 2-core machine. It reads no pip configuration, so where it cannot reach its index (a pip-only
# mirror) or DFLASH_INSTALLER=pip is set, pip does the install; --no-compile skips byte-compiling
# every installed file (Python compiles what it imports, on first import).
if [ "${DFLASH_INSTALLER:-uv}" = uv ] && "$VENV/bin/pip" install -q uv 2>/dev/null; then
  echo "[setup] installing dflash_gptoss with extras torch,jax,tpu-plan,modal,dev (uv)"
  if ! "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" -e "$SPEC"; then
    echo "[setup] uv could not install (see above); installing with pip instead (a few minutes)"
    "$VENV/bin/pip" install -q --no-compile -e "$SPEC"
  fi
else
  echo "[setup] installing dflash_gptoss with extras torch,jax,tpu-plan,modal,dev (pip: a few minutes the first time)"
  "$VENV/bin/pip" install -q --no-compile -e "$SPEC"
fi
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, jax, easydel; print(f"torch {torch.__version__}, transformers {transformers.__version__}, jax {jax.__version__}, easydel {easydel.__version__}")' 2>/dev/null | tail -1)"
