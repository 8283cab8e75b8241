#!/usr/bin/env bash
# Everything that needs a GPU, in one run of about 8 minutes on an H100:
#   (a) every cuda-marked test (pytest -m cuda: each capability's core and callback, fp32 and bf16-mixed,
#       and the contract suite's CUDA promise),
#   (b) benchmarks/gpu_fit.py: one real Trainer.fit of WRN-16-4 with each capability switched on in turn,
#       step time with and without it and the ratio, fp32 and bf16-mixed,
#   (c) the GPU benchmarks (averaging, dp).
# Each stage has its own time limit, so one that hangs can't eat the others' time.
# Output goes under $OUT if set, else a new temporary folder (printed at the end).
#
# Usage (from the repository root, torch/pytorch-lightning/opacus/tensorboard installed):
#   bash benchmarks/run_gpu.sh            # on a CUDA machine
#   bash benchmarks/run_gpu.sh --smoke    # anywhere: gpu_fit.py with tiny sizes, 2 steps per fit (CPU check)
# A machine without internet that lacks a package (the lent GPU machines have no opacus): fetch its wheels
# beside the repository first with `bash benchmarks/gpu_wheels.sh` (into .whl/, git-ignored) and bring .whl/
# along; this script installs them into a temporary folder before anything runs.
set -uo pipefail
smoke=0
[[ ${1:-} == --smoke ]] && smoke=1
out=${OUT:-$(mktemp -d -t run_gpu.XXXXXX)}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d -t run_gpu_site.XXXXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:$site
fi
status=0

if ((smoke)); then
  OUT="$out" timeout 300 python3 benchmarks/gpu_fit.py --smoke 2>&1 | grep -v -E "^(GPU|TPU) available|Tip:|stopped:" \
    | tee "$out/gpu_fit.txt" || status=1
  echo "smoke run: output in $out"
  exit $status
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 220 python3 -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests 2>&1 \
  | tail -25 | tee "$out/cuda_tests.txt" || status=1
OUT="$out" timeout 210 python3 benchmarks/gpu_fit.py 2>&1 | grep -v -E "^(GPU|TPU) available|Tip:|stopped:" \
  | tee "$out/gpu_fit.txt" || status=1
timeout 45 python3 benchmarks/bench_averaging.py 2>&1 | grep -E "device|ms|ratio" \
  | tee "$out/bench_averaging.txt" || status=1
timeout 60 python3 benchmarks/bench_dp.py --modes hooks,bk 2>&1 | grep -E "device|ms" | tee "$out/bench_dp.txt" || status=1
timeout 40 python3 benchmarks/bench_dp.py --precision bf16-mixed --modes hooks,bk 2>&1 | grep -E "device|ms" \
  | tee -a "$out/bench_dp.txt" || status=1
echo "output in $out"
exit $status
