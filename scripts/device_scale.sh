#!/usr/bin/env bash
# Paper scale (issue 24) for the Llama-3-8B stand-in in one device call, from the repository root:
#   scripts/device_pipeline.sh carry                  # here, beside ../shared/data: ref-en-16m (its tokenizer is the
#                                                     # stand-in's) and the heldout text, into .carry/data
#   scripts/device_wheels.sh                          # here: .whl/peers (tests) and .whl/lab (paper)
#   ANY4_GIT_COMMIT=<sha> scripts/device_scale.sh [tests] [standin] [bench] [capped] [seq70b] [methods] [paper]
#                                                     # on the device; `carry`: .carry/data and .whl/peers for tests,
#                                                     # .carry/lite for the stand-in steps, + .whl/lab for paper
# Steps (default standin bench; to fit the 10-minute call limit, run one or two per call on the same warm machine):
# 0. tests: `make test-gpu` (every test marked gpu), its log to results/gpu_tests/<GPU>_make_test_gpu_<commit>.log.
# 1. Writes the stand-in (published Llama-3-8B shapes, seeded random weights, 16 GB in 4 shards) under $STANDINS
#    unless it is there: time, memory and machinery only, never accuracy.
# 2. python -m any4lib.bench.scale: load, calibrate (the prompt), quantize any4 g128, save, load_quantized and a
#    4-window perplexity through the kernels, each stage timed with its peak GPU memory; then the quantize time of
#    int4, nf4, fp4, MX-FP4 and NVFP4. A run already in results/scale/ is skipped.
# 3. capped: the 8B stand-in under a 12 GB GPU memory cap: the bf16 load of the in-memory path (16 GB) does not fit,
#    the layer-by-layer path (any4lib.streaming) quantizes, writes its shards, reloads and runs the perplexity.
# 4. seq70b: the Llama-3-70B stand-in, each layer generated on the GPU, quantized any4 g128 (or SEQ70B_RUNS) layer
#    by layer with the peak GPU memory recorded (target < 80 GB), then 4 perplexity windows (SEQ70B_WINDOWS) through
#    the kernels (no shards written).
# 5. methods: the 8B stand-in, generated on the GPU layer by layer, any4 g128, by each of METHODS (default gptq awq
#    awq+gptq) on 128 x 2048 calibration tokens of the held-out text (CALIBRATION): time and peak memory per method;
#    each under METHOD_TIMEOUT seconds (default 280; a stopped one leaves its per-layer rate in the log).
# 6. paper: `make -B reproduce PROFILE=paper` pointed at the Llama-3.2-1B stand-in (written first), on the sets
#    that exist offline (WikiText-2, PTB); records are stored as they finish, so a rerun continues a stopped one
#    (under PAPER_TIMEOUT seconds, default 480, so that the records made so far still come back).
# Logs go to $OUT; the result files it wrote come back as $OUT/results.tar (unpack it at the repository root).
set -uo pipefail
OUT=${OUT:-/tmp/any4_scale}
STANDINS=${STANDINS:-/tmp/any4_standins}
mkdir -p "$OUT"
source scripts/device_env.sh
status=0
touch "$OUT/.start"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
steps=${*:-standin bench}
if [[ " $steps " == *" tests "* ]]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -o 'H[0-9]*' || echo GPU)
  log=results/gpu_tests/${gpu}_make_test_gpu_${ANY4_GIT_COMMIT:-unknown}.log
  echo "# make test-gpu at ${ANY4_GIT_COMMIT:-?} on $(head -n 1 "$OUT/device.txt"), $(date -u +%F)" > "$log"
  timeout "${TESTS_TIMEOUT:-540}" make test-gpu 2>&1 | tee -a "$log" || status=1
fi
if [[ " $steps " == *" standin "* ]]; then
  python3 scripts/make_standins.py llama-3-8b --out "$STANDINS" 2>&1 | tail -n 2 | tee "$OUT/standin.log" || status=1
fi
if [[ " $steps " == *" bench "* ]]; then
  python3 -m any4lib.bench.scale --model "$STANDINS/llama-3-8b-standin" --format any4 --group-size 128 --device cuda \
    2>&1 | tee "$OUT/scale_8b.log" || status=1
fi
if [[ " $steps " == *" capped "* ]]; then
  python3 -m any4lib.bench.scale --model "$STANDINS/llama-3-8b-standin" --format any4 --group-size 128 --device cuda \
    --sequential --memory-cap-gb 12 2>&1 | tee "$OUT/scale_8b_capped.log" || status=1
fi
if [[ " $steps " == *" seq70b "* ]]; then
  # SEQ70B_RUNS: "format:seconds ..." (default one any4 run, no limit); a run stopped by its limit leaves its per-layer
  # progress in the log but no record.
  for run in ${SEQ70B_RUNS:-any4:0}; do
    timeout "${run#*:}" python3 -m any4lib.bench.scale --model llama-3-70b --format "${run%%:*}" --group-size 128 \
      --device cuda --sequential --no-save --windows "${SEQ70B_WINDOWS:-4}" --progress 2>&1 \
      | tee "$OUT/scale_70b_${run%%:*}.log" || status=1
  done
fi
if [[ " $steps " == *" methods "* ]]; then
  for method in ${METHODS:-gptq awq awq+gptq}; do
    timeout "${METHOD_TIMEOUT:-280}" python3 -m any4lib.bench.scale --model llama-3-8b --format any4 \
      --group-size 128 --device cuda --sequential --no-save --method "$method" --calibration "${CALIBRATION:-heldout:128x2048}" \
      --progress 2>&1 | tee "$OUT/scale_8b_${method/+/_}.log" || status=1
  done
fi
if [[ " $steps " == *" paper "* ]]; then
  python3 scripts/make_standins.py llama-3.2-1b --out "$STANDINS" 2>&1 | tail -n 1 | tee "$OUT/standin_1b.log" || status=1
  timeout "${PAPER_TIMEOUT:-480}" make -k -B reproduce PROFILE=paper MODEL="$STANDINS/llama-3.2-1b-standin" \
    NOTEBOOK_PARAMS='-y "{datasets: [wikitext2, ptb], dataset: wikitext2}"' 2>&1 | tee "$OUT/paper.log" || status=1
  cp -r figures results/tables "$OUT/" 2>/dev/null
fi
find results -type f -newer "$OUT/.start" | tar -cf "$OUT/results.tar" -T -
tar -tf "$OUT/results.tar"
exit $status
