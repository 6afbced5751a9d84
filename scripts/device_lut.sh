#!/usr/bin/env bash
# Run on the GPU machine (the `device` tool): core GPU tests + the LUT-learning benchmark on CUDA and CPU.
set -uo pipefail
export ANY4_DATA="${ANY4_DATA:-$PWD/.carry/data}"
mkdir -p "$OUT"
pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "editable install failed (see install.log)"
python -m pytest -q -ra -m gpu tests/test_quant.py 2>&1 | tee "$OUT/gpu_tests.log"
python -m any4lib.bench.lut --device cuda --out "$OUT/lut" 2>&1 | tee "$OUT/lut_cuda.log"
