#!/usr/bin/env bash
# The cluster issue's GPU checks (AMP, nccl, CUDA torch vs ONNX Runtime, Serve on the GPU) in under
# 5 minutes. Run on a GPU node from the repository root: bash bench/gpu_check.sh. Never in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout 300 "$PY" bench/gpu_check.py "$@"
