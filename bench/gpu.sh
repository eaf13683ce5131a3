#!/usr/bin/env bash
# The GPU benchmark, prepared for a machine with one NVIDIA GPU (device time is scarce: one short run).
# ResNet-18 at 224 px, batch 256, bf16 autocast + channels_last: B1 plain PyTorch and B2 the retrain flow on
# one Ray Train worker with the GPU, each the median of 3; prints img/s and the share of the bf16 FLOP limit.
# Needs the project venv (`make bootstrap`); with --b1-only it needs torch + torchvision + numpy and the
# packages of headbench's settings and data (pydantic-settings, boto3); --ray-alone adds ray[default,train].
# Data: Fashion-MNIST from the cache in $HEADBENCH_HOME/cache (or the Debian package / official URL).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout "${BENCH_TIMEOUT:-290}" "$PY" -m bench --gpu --json "${OUT:-bench}/gpu-results.json" "$@"
