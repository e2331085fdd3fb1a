#!/usr/bin/env bash
# Quickstart on the embedded default target (CPU, offline): train a small EAGLE-3 drafter with LK^lambda,
# check its acceptance in vLLM, and serve it with live statistics. Run from the repository root after
# `make setup`. Each command's --help documents its flags.
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"

lk-vllm models                                                   # build SmolLM2-135M-Instruct once (~30 s)
lk-vllm train --recipe smoke-eagle3 --loss lambda --eta 3 --output runs/quickstart   # prepare + train + export
lk-vllm eval --drafter runs/quickstart/best --engine vllm --dataset mtbench --limit 8 \
    --temperature 0 --num-speculative-tokens 3 --json
# OpenAI-compatible server with the drafter; live stats at /v1/speculative/stats, dashboard at /dashboard.
lk-vllm serve --drafter runs/quickstart/best --num-speculative-tokens 3 --admin-key change-me --port 8000
