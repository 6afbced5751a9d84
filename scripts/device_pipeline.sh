#!/usr/bin/env bash
# The library's GPU checks outside the kernel and e2e suites, in one device call, from the repository root:
#   scripts/device_pipeline.sh carry                  # here, beside ../shared/data: stage what the device needs
#   ANY4_GIT_COMMIT=<sha> scripts/device_pipeline.sh  # on the device, with .carry/data named in `carry`
# `carry` stages two folders: .carry/data (35 MB: the models and texts the GPU tests read) and .carry/lite (5 MB: the
# texts and ref-en-16m's tokenizer alone, all the stand-in runs of device_scale.sh read), so that a call carrying
# .whl/lab (the notebooks' packages) stays under the 64 MB a call carries; scripts/device_env.sh reads whichever came.
# 1. GPU tests of the quantization core, QuantLinear and the kernel-path perplexity (issue 8: within 0.5%).
# 2. LUT learning speed on CUDA (results/lut/any4_cuda.json).
# 3. ref-en-16m perplexity on heldout, fake-quant vs the tinygemm kernels (profiles gpu_fake, gpu_kernels).
# Logs go to $OUT; the result files it wrote come back as $OUT/results.tar (unpack it at the repository root).
set -uo pipefail
if [ "${1:-}" = carry ]; then
  src=${ANY4_DATA:-../shared/data}
  mkdir -p .carry/data/models .carry/data/corpora/ref-en
  cp -r "$src/models/ref-en-16m" "$src/models/stories260K" .carry/data/models/
  cp "$src/corpora/ref-en/heldout.txt" .carry/data/corpora/ref-en/
  cp -r "$src/wikitext-2-v1" "$src/ptb" .carry/data/  # the paper profile's offline sets (device_scale.sh paper)
  rm -rf .carry/lite && mkdir -p .carry/lite/models/ref-en-16m
  cp -r .carry/data/corpora .carry/data/wikitext-2-v1 .carry/data/ptb .carry/lite/
  cp .carry/data/models/ref-en-16m/{config.json,tokenizer.json,tokenizer_config.json} .carry/lite/models/ref-en-16m/
  du -sh .carry/*
  exit 0
fi
OUT=${OUT:-/tmp/any4_pipeline}
mkdir -p "$OUT"
source scripts/device_env.sh
status=0
touch "$OUT/.start"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -m pytest -q -ra -p no:cacheprovider -m gpu tests/test_quant.py tests/test_nn.py \
  tests/test_kernel_perplexity_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" || status=1
python3 -m any4lib.bench.lut --device cuda 2>&1 | tee "$OUT/lut_cuda.log" || status=1
python3 -m any4lib.experiments accuracy --device cuda --profile gpu_fake --profile gpu_kernels 2>&1 \
  | tee "$OUT/accuracy_gpu.log" || status=1
find results -type f -newer "$OUT/.start" | tar -cf "$OUT/results.tar" -T -
tar -tf "$OUT/results.tar"
exit $status
