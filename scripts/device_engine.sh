#!/usr/bin/env bash
# The generation engine (issue 23) in one device call, from the repository root (models under $ANY4_DATA/models):
#   scripts/device_engine.sh [tests] [bench8b] [real] [cli]
# tests: the GPU tests of the engine (shared models against transformers, the Zoo continuation), QuantLinear's packed
# form and the e2e decoder. bench8b: the Llama-3-8B-shape rows through the engine (random weights) into
# results/e2e/controls/decode_engine.csv, to set beside results/e2e/decode.csv. real: ref-en-16m, the engine beside
# transformers' generate on the same quantized model, b = 1 and 16, into results/e2e/real/ref-en-16m.csv. cli:
# `any4 quantize` then `any4 generate` on the saved folder. Logs and CSVs are copied to $OUT (default /tmp/any4_engine).
set -uo pipefail
OUT=${OUT:-/tmp/any4_engine}
mkdir -p "$OUT" results/e2e/controls results/e2e/real
source scripts/device_env.sh
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests bench8b real cli)
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
timeout 300 python3 -c "from any4lib.kernels import load_kernels; load_kernels(); print('kernels loaded')" \
  2>&1 | tee "$OUT/build.log"
for step in "${steps[@]}"; do
  start=$SECONDS
  case $step in
    tests)
      timeout "${TESTS_LIMIT_S:-240}" python3 -m pytest -q -ra -p no:cacheprovider -m gpu tests/test_engine_gpu.py \
        tests/test_nn.py tests/test_e2e.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/tests.log"
      rc=${PIPESTATUS[0]} ;;
    bench8b)
      timeout "${BENCH_LIMIT_S:-150}" python3 -m any4lib.bench.e2e --model-config llama3-8b \
        --formats "${BENCH_METHODS:-bf16,any4,int4}" --peers "" --batch "${BENCH_BATCH:-1}" --prompt 512 --new 128 \
        --out results/e2e/controls/decode_engine.csv 2>&1 | tee "$OUT/bench8b.log"
      rc=${PIPESTATUS[0]}
      cp results/e2e/controls/decode_engine.csv "$OUT/" 2>/dev/null ;;
    real)
      timeout "${REAL_LIMIT_S:-150}" python3 -m any4lib.bench.e2e --model ref-en-16m --hf-generate \
        --formats "${REAL_METHODS:-bf16,any4}" --peers "" --batch 1,16 --prompt 64 --new 64 \
        --out results/e2e/real/ref-en-16m.csv 2>&1 | tee "$OUT/real.log"
      rc=${PIPESTATUS[0]}
      cp results/e2e/real/ref-en-16m.csv "$OUT/" 2>/dev/null ;;
    cli)
      (timeout 60 python3 -m any4lib.cli quantize --model ref-en-16m --format any4 --group-size 128 --calibration prompt --device cuda \
         --out /tmp/ref-any4 && timeout 60 python3 -m any4lib.cli generate --model /tmp/ref-any4 --device cuda --max-new-tokens 48 \
         --prompt "The history of the city" --prompt "In 1905 the") 2>&1 | tee "$OUT/cli.log"
      rc=${PIPESTATUS[0]} ;;
    *) echo "unknown step $step (tests, bench8b, real, cli)"; rc=2 ;;
  esac
  echo "== $step: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
done
exit $status
