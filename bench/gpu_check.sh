#!/usr/bin/env bash
# The CUDA bf16 check (bench/gpu_check.py) on one GPU, under 8 minutes: every method on SmolLM2 in bf16
# against fp32, FuseGPT --profile paper for one fusion, the scale model with --offload cpu; peak device
# memory of each. Needs `make setup`'s packages and ../shared/data; exits non-zero on any failure and
# writes bench/results/gpu_check.{json,md}.
#   bash bench/gpu_check.sh [--windows 20] [--scale-model /tmp/scale-1b]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export COMPRESS_EVAL_DATA_DIR="${COMPRESS_EVAL_DATA_DIR:-$(cd .. && pwd)/shared/data}" PYTHONUNBUFFERED=1
timeout 480 python3 bench/gpu_check.py "$@"
