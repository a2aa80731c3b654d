#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): on one GPU, no internet, under 8 minutes. Prints ESQ and Madry
# throughput and peak memory for WRN-28-10 and ResNet-152 under float32, bf16, bf16+channels_last and +compile,
# the ESQ/Madry ratio against its floor, bf16-vs-float32 logit agreement, and a 2-process DDP step.
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root (or: make gpu-check)
#   bash benchmarks/gpu_check.sh --cpu      # the tiny CPU form the test suite runs
# Extra arguments go to the Python module (--models, --batch, --steps, --no-compile, --no-ddp, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" WANDB_MODE=offline HF_HUB_OFFLINE=1
# A hard stop at 8 minutes; the module writes its JSON after every section, so a stopped run keeps its numbers.
exec timeout --signal=INT 470 "$PY" -m benchmarks.gpu_check "$@"
