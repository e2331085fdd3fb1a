#!/usr/bin/env bash
# The trainer's GPU check (scripts/gpu_check.py), with its output kept in gpu-check-<UTC time>.log
# (or in $GPU_CHECK_LOG).
#   scripts/gpu_check.sh                 # on the GPU: loss, 300 training steps, DDP, FSDP2 (a few minutes)
#   scripts/gpu_check.sh --device cpu --steps 4 --seq-len 128 --batch 2   # the same stages on a CPU (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
log="${GPU_CHECK_LOG:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ).log}"
PYTHONUNBUFFERED=1 "$PYTHON" scripts/gpu_check.py "$@" 2>&1 | tee "$log"
