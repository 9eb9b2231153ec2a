#!/usr/bin/env bash
# The GPU check (see benchmarks/device_check.py): correctness on cuda and speed against diffusers, within 8 minutes.
#
#   benchmarks/device_check.sh            # on a machine with an NVIDIA GPU: installs .venv, runs everything
#   benchmarks/device_check.sh --quick    # small sizes (CI); any other flags go to device_check.py
#
# Installation comes from the project alone: `scripts/setup.sh test` creates .venv with vaekit, its test extra
# (diffusers) and torch. pip's default torch wheel on Linux x86_64 is the CUDA build, so where a GPU is present this
# script leaves VAEKIT_TORCH_INDEX unset (set it yourself to pick another wheel index, e.g. a cu128 one, and
# VAEKIT_TORCH for another version). A .venv that already has a CPU-only torch is reported, not silently used.
# Offline GPU machines (an image with CUDA torch but no network, no diffusers): when python3 already has a CUDA torch
# it is used as is, and VAEKIT_WHEELS=<dir of .whl files> (diffusers, importlib_metadata, ...) is installed with
# `pip --no-index --target` into a temporary folder first. Without a GPU nothing is installed: an existing
# interpreter (VAEKIT_PYTHON, else .venv/bin/python, else python3) runs the CPU sanity part, prints one line that the cuda part is skipped, and the script exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  has_gpu=1
fi
if [ -n "${VAEKIT_WHEELS:-}" ]; then
  site="${TMPDIR:-/tmp}/vaekit-device-check-site"
  "${VAEKIT_PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$VAEKIT_WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$has_gpu" = 1 ] && [ -z "${VAEKIT_PYTHON:-}" ] && python3 -c "import sys, torch, diffusers, safetensors; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  nvidia-smi -L
  python=python3  # a CUDA torch and diffusers are already there (an offline image, with VAEKIT_WHEELS): no install
elif [ "$has_gpu" = 1 ] && [ -z "${VAEKIT_PYTHON:-}" ]; then
  nvidia-smi -L
  if ! .venv/bin/python -c "import vaekit, diffusers, torch" >/dev/null 2>&1; then
    echo "installing: scripts/setup.sh test (torch ${VAEKIT_TORCH:-torch==2.13.0}, index ${VAEKIT_TORCH_INDEX:-pip default})"
    scripts/setup.sh test
  fi
  python=.venv/bin/python
  if ! "$python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
    echo "warning: .venv has a CPU-only torch although a GPU is present; remove .venv (or set VAEKIT_TORCH_INDEX to a CUDA wheel index) and rerun" >&2
  fi
else
  python="${VAEKIT_PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
  fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$python" benchmarks/device_check.py "$@"
