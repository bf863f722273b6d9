#!/usr/bin/env bash
# The device check: one GPU or TPU chip, under 8 minutes (see benchmarks/device_check.py).
#   benchmarks/device_check.sh [OUT_DIR]      (default: $OUT when set, else benchmarks/results)
# Needs jax for the backend: pip install -e ".[cuda]" (GPU) or -e ".[tpu]" (TPU).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
py="$(command -v python3 || command -v python)"  # the GPU image's python3 holds its JAX
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$py" benchmarks/device_check.py --out "$out/device_check.json" "${@:2}"
