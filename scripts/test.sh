#!/usr/bin/env bash
# Set up .venv if needed, then run the lint and the whole test suite on CPU.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k decoding`).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup_env.sh"
cd "$REPO"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1
.venv/bin/ruff check dflash_gptoss scripts tests modal
exec .venv/bin/python -m pytest -q "$@"
