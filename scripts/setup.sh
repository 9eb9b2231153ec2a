#!/usr/bin/env bash
# Create .venv and install vaekit with the given extras (e.g. `scripts/setup.sh test`).
# PyTorch: an already installed torch is kept. Otherwise the CPU build is installed, so a CPU-only machine never
# pulls the multi-GB CUDA wheels: VAEKIT_TORCH (default torch==2.13.0) from VAEKIT_TORCH_INDEX when set
# (point it at PyTorch's CPU wheel index on ordinary machines), else from pip's configured sources.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${VAEKIT_TORCH_INDEX:-}" ]; then
    "${pip[@]}" --index-url "$VAEKIT_TORCH_INDEX" "${VAEKIT_TORCH:-torch==2.13.0}"
  else
    "${pip[@]}" "${VAEKIT_TORCH:-torch==2.13.0}"
  fi
fi
if [ -n "$extras" ]; then
  "${pip[@]}" -e ".[$extras]"
else
  "${pip[@]}" -e .
fi
