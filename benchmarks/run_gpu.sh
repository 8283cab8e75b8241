#!/usr/bin/env bash
# Everything that needs a GPU, in one short run: the CUDA-marked tests, then the GPU benchmarks.
# Usage (on a CUDA machine with torch, pytorch-lightning, torchmetrics, tensorboard and opacus installed):
#   bash benchmarks/run_gpu.sh [output-folder] [benchmarks: averaging,dp]
set -uo pipefail
out=${1:-bench_out}
which=${2:-averaging,dp}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tail -15 | tee "$out/cuda_tests.txt"
if [[ $which == *averaging* ]]; then
  python3 benchmarks/bench_averaging.py 2>&1 | grep -E "device|ms|ratio" | tee "$out/bench_averaging.txt"
fi
if [[ $which == *dp* ]]; then
  python3 benchmarks/bench_dp.py 2>&1 | grep -E "device|ms" | tee "$out/bench_dp.txt"
  python3 benchmarks/bench_dp.py --precision bf16-mixed --modes hooks 2>&1 | grep -E "device|ms" | tee -a "$out/bench_dp.txt"
fi
