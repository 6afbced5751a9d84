#!/usr/bin/env bash
# Weight-activation GEMMs on the GPU (issue 33), in one device call from the repository root:
#   ANY4_GIT_COMMIT=<sha> scripts/device_wa.sh
# 1. QuantLinear's int8 (torch._int_mm) and FP8 (torch._scaled_mm, row-wise scales) paths against its fake
#    quantization (tests/test_wa_matmul_gpu.py).
# 2. python -m any4lib.bench.wa: both paths beside bf16 cuBLAS on the Llama-3-8B shapes, m = 1..4096, the speed-up
#    printed beside each time; the CSV goes to $OUT/results/wa_gemm/ (copy it to results/wa_gemm/ here).
set -uo pipefail
OUT=${OUT:-/tmp/any4_wa}
mkdir -p "$OUT"
source scripts/device_env.sh
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -m pytest -q -ra -p no:cacheprovider -m gpu tests/test_wa_matmul_gpu.py 2>&1 | tee "$OUT/wa_tests.log" \
  || status=1
python3 -m any4lib.bench.wa --out "$OUT/results/wa_gemm" 2>&1 | tee "$OUT/wa_bench.log" || status=1
exit $status
