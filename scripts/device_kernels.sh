#!/usr/bin/env bash
# Everything tinygemm needs a GPU for, in one device call (docs/KERNELS.md):
#   scripts/device_kernels.sh [build] [tests] [sanitizer] [bench] [ncu]    (no argument: these five)
#   extra steps: prefill (m = $PREFILL_ROWS, default 512: the dequantize kernel + cuBLAS against cuBLAS bf16),
#   variants (a -DTINYGEMM_TUNING build: GPU tests with the chosen variant, then every variant in
#   $VARIANTS checked and timed side by side on three Llama shapes, then the candidate's bench there; VARIANT_TESTS=0
#   and CANDIDATE=0 skip the tests and the candidate's bench),
#   debug (the bad-input test under cuda-gdb), ncu-e2e (ncu of a decode layer's four GEMMs at m = 1, any4 and int4),
#   env-ab (the bench on $SHAPES / $ROWS in two processes of one build, with the environment setting $AB_ENV, e.g.
#   ANY4_TINYGEMM_PDL=0, and without: a switch of the binding measured against the default in one call),
#   ab (the bench on $SHAPES / $ROWS with this tree's kernels, then with the tinygemm sources in $BASELINE_SRC, a
#   carried copy of an earlier tinygemm_src, in a second process: a change measured against its baseline in one call)
# Logs and the benchmark CSV go to $OUT (default /tmp/any4_kernels). Run from the repository root; set
# ANY4_GIT_COMMIT=<hash> on the device (its copy of the tree has a stale .git or none), so the CSV records which
# code ran.
set -uo pipefail
OUT=${OUT:-/tmp/any4_kernels}
mkdir -p "$OUT"
source scripts/device_env.sh
steps=${*:-build tests sanitizer bench ncu}
status=0
run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, keep going on failure, remember it
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/device.txt"
for step in $steps; do
  case $step in
    build) run build 300 python3 -c "from any4lib.kernels import load_kernels; load_kernels(); print('loaded')"
           find "$ANY4_CACHE" -name "*.so" -exec cuobjdump --dump-resource-usage {} \; >> "$OUT/build.log" 2>&1 ;;
    tests) run tests 400 python3 -m pytest -q -ra -p no:cacheprovider tests/test_kernels_gpu.py ;;
    sanitizer) run sanitizer 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 3 python3 -c "
import torch
from any4lib.engine.random_weights import random_quantized
from any4lib.kernels import PackedWeight, linear
for fmt, g in [('int4', 64), ('any4', 32), ('nf4', 128), ('mxfp4', 32)]:
    for dtype in (torch.bfloat16, torch.float16):
        w = PackedWeight.from_quantized(random_quantized(fmt, 200, 352 if g == 32 else 384, g), dtype)
        gated = PackedWeight.from_gate_up(*(random_quantized(fmt, 200, w.k, g) for _ in range(2)), dtype)
        for m in (1, 7, 9, 16, 40):  # 40: the dequantize kernel
            y = linear(torch.randn(m, w.k, device='cuda').to(dtype), w)
            y = linear(torch.randn(m, w.k, device='cuda').to(dtype), gated)  # the SwiGLU epilogue
torch.cuda.synchronize()
print('memcheck run done')" ;;
    bench) run bench 400 python3 -m any4lib.bench.kernels --out "$OUT" ;;
    prefill) run prefill 200 python3 -m any4lib.bench.kernels --out "$OUT" --prefill "${PREFILL_ROWS:-512}" \
        --shapes "${PREFILL_SHAPES:-28672x4096,4096x14336,6144x4096,4096x4096}" ;;
    ncu) run ncu 200 ncu --clock-control none --kernel-name regex:tinygemm --launch-count 3 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section ComputeWorkloadAnalysis python3 -c "
import torch
from any4lib.engine.random_weights import random_quantized
from any4lib.kernels import PackedWeight, linear
for fmt, m in (('int4', 1), ('any4', 1), ('any4', 16)):
    w = PackedWeight.from_quantized(random_quantized(fmt, 28672, 8192, 128), torch.bfloat16)
    linear(torch.randn(m, 8192, device='cuda', dtype=torch.bfloat16), w)
torch.cuda.synchronize()" ;;
    ncu-e2e) run ncu_e2e 300 ncu --clock-control none --kernel-name regex:tinygemm \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SchedulerStats python3 -c "
import torch
from any4lib.engine.random_weights import random_quantized
from any4lib.kernels import PackedWeight, linear
for fmt in ('any4', 'int4'):  # a decode layer's GEMMs at m = 1: q/k/v, o, gate/up (SwiGLU), down
    for n, k, gated in ((6144, 4096, False), (4096, 4096, False), (14336, 4096, True), (4096, 14336, False)):
        q = lambda: random_quantized(fmt, n, k, 128)
        w = PackedWeight.from_gate_up(q(), q()) if gated else PackedWeight.from_quantized(q())
        linear(torch.randn(1, k, device='cuda', dtype=torch.bfloat16), w)
torch.cuda.synchronize()" ;;
    variants) export ANY4_TINYGEMM_CUDA_FLAGS=-DTINYGEMM_TUNING
        run variants_build 300 python3 -c "from any4lib.kernels import load_kernels; load_kernels(); print('loaded')"
        find "$ANY4_CACHE" -name "*.so" -newer "$OUT/device.txt" -exec cuobjdump --dump-resource-usage {} \; \
          > "$OUT/variants_build_resources.log" 2>&1
        [ "${VARIANT_TESTS:-1}" = 0 ] || run variants_tests 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py
        run variants 400 python3 -m any4lib.bench.kernels --out "$OUT" --rows "${ROWS:-1,4,16}" \
          --shapes "${SHAPES:-28672x8192,4096x14336,14336x4096}" --variants "${VARIANTS:-base:}"
        [ "${CANDIDATE:-1}" = 0 ] || run variants_bench 300 python3 -m any4lib.bench.kernels --out "$OUT/candidate" \
          --rows "${ROWS:-1,4,16}" --shapes "${SHAPES:-28672x8192,4096x14336,14336x4096}"
        unset ANY4_TINYGEMM_CUDA_FLAGS ;;
    ab) shapes=${SHAPES:-28672x8192,4096x14336,14336x4096} rows=${ROWS:-1,4,16}
        run ab_new 300 python3 -m any4lib.bench.kernels --out "$OUT/new" --shapes "$shapes" --rows "$rows"
        saved=$(mktemp -d) && cp -r tinygemm_src/. "$saved/" && rm -rf tinygemm_src/* \
          && cp -r "${BASELINE_SRC:?set BASELINE_SRC}/." tinygemm_src/  # the baseline's files only
        run ab_baseline 300 python3 -m any4lib.bench.kernels --out "$OUT/baseline" --shapes "$shapes" --rows "$rows"
        rm -rf tinygemm_src && mkdir tinygemm_src && cp -r "$saved/." tinygemm_src/ ;;
    env-ab) shapes=${SHAPES:-28672x4096,4096x14336,6144x4096,4096x4096} rows=${ROWS:-1,2,4}
        run env_ab_default 300 python3 -m any4lib.bench.kernels --out "$OUT/default" --shapes "$shapes" --rows "$rows"
        run env_ab_switched 300 env "${AB_ENV:?set AB_ENV}" python3 -m any4lib.bench.kernels --out "$OUT/switched" \
          --shapes "$shapes" --rows "$rows" ;;
    debug) run debug 200 cuda-gdb -batch -ex run -ex bt --args python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_kernels_gpu.py -k bad_inputs ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
