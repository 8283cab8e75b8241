#!/usr/bin/env bash
# Wheels of the packages benchmarks/run_gpu.sh needs that a bare CUDA image may lack (opacus: pure Python; its
# own needs numpy, scipy, opt-einsum and torch are on such images), downloaded here into .whl/ (git-ignored),
# for a GPU machine that cannot reach a package index. run_gpu.sh installs whatever it finds in .whl/.
#
#   bash benchmarks/gpu_wheels.sh              # opacus at the version installed here
#   bash benchmarks/gpu_wheels.sh opacus==1.6.0
set -euo pipefail
spec=${1:-opacus==$(python3 -c "import importlib.metadata as m; print(m.version('opacus'))")}
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$spec"
ls -l .whl
