#!/usr/bin/env bash
# End-to-end decode speed (issue 6) in one device call, from the repository root:
#   ANY4_GIT_COMMIT=<commit> scripts/device_e2e.sh [profile] [bench] [tests] [reduce-overhead] [-- extra bench arguments]
# profile: where one decode step's time goes (any4lib/bench/profile.py), old layout (separate q/k/v, gate/up;
# masked SDPA) against the new (fused; Triton split-K decode attention), b=1: results/e2e/profile/profile.{csv,txt}.
# BENCH_OUT: another CSV for the bench step (a control). qhead: optional rows with lm_head quantized too.
# sdpa-control: the new layout with masked SDPA attention. pdl-ab: programmatic dependent launch x the norm kernel.
# swiglu-ab: silu(gate) * up in the gate/up GEMM's epilogue against its own kernel. env-ab: the default against the
# environment setting $AB_ENV (e.g. ANY4_TINYGEMM_PDL=0), tree-ab: this tree against a carried earlier one
# ($BASELINE_TREE); both named $AB_NAME in the control CSVs.
# With ANY4_RESTORE_CLEAN=1 (on the device only: it overwrites files), .carry/clean (files of a committed tree, laid
# out as in the repository) is copied over the tree first, so that a run measures committed kernels even when the
# working tree it was sent from holds someone's unfinished edits.
# Peers travel as .whl/peers (scripts/device_wheels.sh, run here; name it in `carry`). The CSV is
# results/e2e/decode.csv, so a CSV carried from an earlier call resumes; it and the logs are copied to $OUT
# (default /tmp/any4_e2e).
set -uo pipefail
[ "${ANY4_RESTORE_CLEAN:-0}" = 1 ] && [ -d .carry/clean ] && cp -r .carry/clean/. . && echo "restored committed files: $(cd .carry/clean && find . -type f | tr '\n' ' ')"
OUT=${OUT:-/tmp/any4_e2e}
mkdir -p "$OUT" results/e2e
source scripts/device_env.sh
steps=() extra=()
while [ $# -gt 0 ]; do
  case $1 in --) shift; extra=("$@"); break ;; *) steps+=("$1"); shift ;; esac
done
[ ${#steps[@]} -gt 0 ] || steps=(bench tests)
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/device.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ("transformers", "triton", "bitsandbytes", "gemlite"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # a peer that cannot load is reported by the bench as well
        print(name, "not importable:", type(err).__name__, err)
EOF

# The tinygemm JIT build on its own, so it stays out of the first method's warm-up time.
build_kernels() {
  timeout 300 python3 -c "from any4lib.kernels import load_kernels; load_kernels(); print('kernels loaded')" \
    2>&1 | tee "$OUT/build.log"
}

# One side of an A/B: the bench of $AB_METHODS at batch $AB_BATCH (default any4, int4 at 1) run in folder $2 with the
# environment settings after it, into results/e2e/controls/decode_${AB_NAME}_$1.csv.
ab_side() {
  local side=$1 dir=$2
  shift 2
  local csv=$PWD/results/e2e/controls/decode_${AB_NAME:?set AB_NAME}_$side.csv
  (cd "$dir" && env "$@" timeout "${AB_LIMIT_S:-150}" python3 -m any4lib.bench.e2e --model-config llama3-8b \
    --formats "${AB_METHODS:-any4,int4}" --peers "" --batch "${AB_BATCH:-1}" --prompt 512 --new 128 --out "$csv") \
    2>&1 | tee -a "$OUT/ab.log"
  local rc=${PIPESTATUS[0]}
  cp "$csv" "$OUT/" 2>/dev/null
  return "$rc"
}

for step in "${steps[@]}"; do
  start=$SECONDS
  case $step in
    profile)
      build_kernels
      timeout "${PROFILE_LIMIT_S:-300}" python3 -m any4lib.bench.e2e --profile --model-config llama3-8b \
        --formats "${PROFILE_METHODS:-bf16,any4,int4}" --peers "" --batch "${PROFILE_BATCH:-1}" --prompt 512 --new 128 \
        --profile-variants "${PROFILE_VARIANTS:-separate+sdpa,fused+triton}" --profile-out results/e2e/profile/profile.csv \
        --trace-dir "$OUT" --deadline-s "${PROFILE_DEADLINE_S:-240}" 2>&1 | tee "$OUT/profile.log"
      rc=${PIPESTATUS[0]}
      cp results/e2e/profile/profile.csv results/e2e/profile/profile.txt "$OUT/" 2>/dev/null ;;
    bench)
      build_kernels
      # Leaves room for the later steps; an unfinished run resumes from the CSV in the next call.
      timeout "${BENCH_LIMIT_S:-330}" python3 -m any4lib.bench.e2e --model-config llama3-8b \
        --formats "${BENCH_METHODS:-bf16,any4,int4,torch-int4,gemlite-int4,bnb-nf4,nf4,mxfp4}" \
        --peers "" --batch "${BENCH_BATCH:-1,4,16}" \
        --prompt 512 --new 128 --deadline-s "${BENCH_DEADLINE_S:-230}" --out "${BENCH_OUT:-results/e2e/decode.csv}" \
        "${extra[@]}" 2>&1 | tee "$OUT/e2e.log"
      rc=${PIPESTATUS[0]}
      cp "${BENCH_OUT:-results/e2e/decode.csv}" "$OUT/" 2>/dev/null ;;
    qhead)
      # Optional rows, apart from the main ones (the paper keeps lm_head bf16): lm_head quantized by the method too.
      timeout "${QHEAD_LIMIT_S:-60}" python3 -m any4lib.bench.e2e --model-config llama3-8b --formats any4:qhead,int4:qhead \
        --peers "" --batch "${QHEAD_BATCH:-1}" --prompt 512 --new 128 --deadline-s "${QHEAD_DEADLINE_S:-40}" \
        --out results/e2e/decode.csv "${extra[@]}" 2>&1 | tee "$OUT/qhead.log"
      rc=${PIPESTATUS[0]}
      cp results/e2e/decode.csv "$OUT/" 2>/dev/null ;;
    sdpa-control)
      # The new layout with the old attention (masked SDPA over the whole cache), to isolate the attention kernel.
      timeout "${CONTROL_LIMIT_S:-60}" python3 -m any4lib.bench.e2e --model-config llama3-8b --formats "${CONTROL_METHODS:-bf16}" \
        --peers "" --batch "${CONTROL_BATCH:-16}" --prompt 512 --new 128 --attention sdpa \
        --deadline-s "${CONTROL_DEADLINE_S:-40}" --out results/e2e/controls/decode_sdpa_control.csv "${extra[@]}" 2>&1 | tee "$OUT/control.log"
      rc=${PIPESTATUS[0]}
      cp results/e2e/controls/decode_sdpa_control.csv "$OUT/" 2>/dev/null ;;
    pdl-ab)
      # Programmatic dependent launch of the tinygemm GEMMs (ANY4_TINYGEMM_PDL) x the norm kernel (--norm), batch 1,
      # side by side in one call: results/e2e/controls/decode_pdl{0,1}.csv, whose norm column tells the norms apart.
      build_kernels
      rc=0
      for pdl in 0 1; do
        for norm in compiled triton; do
          ANY4_TINYGEMM_PDL=$pdl timeout "${AB_LIMIT_S:-150}" python3 -m any4lib.bench.e2e --model-config llama3-8b \
            --formats "${AB_METHODS:-bf16,any4,int4}" --peers "" --batch "${AB_BATCH:-1}" --prompt 512 --new 128 \
            --norm $norm --out results/e2e/controls/decode_pdl$pdl.csv 2>&1 | tee -a "$OUT/pdl_ab.log"
          [ "${PIPESTATUS[0]}" = 0 ] || rc=1
        done
        cp results/e2e/controls/decode_pdl$pdl.csv "$OUT/" 2>/dev/null
      done ;;
    swiglu-ab)
      # The MLP's silu(gate) * up in the gate/up GEMM's epilogue (--swiglu epilogue) against inductor's kernel of the
      # same ops, batch 1, side by side in one call: results/e2e/controls/decode_swiglu.csv (its swiglu column tells
      # them apart; bf16 runs compiled either way, so it is measured once).
      build_kernels
      rc=0
      for swiglu in compiled epilogue; do
        timeout "${AB_LIMIT_S:-150}" python3 -m any4lib.bench.e2e --model-config llama3-8b \
          --formats "${AB_METHODS:-bf16,any4,int4}" --peers "" --batch "${AB_BATCH:-1}" --prompt 512 --new 128 \
          --swiglu $swiglu --out results/e2e/controls/decode_swiglu.csv 2>&1 | tee -a "$OUT/swiglu_ab.log"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done
      cp results/e2e/controls/decode_swiglu.csv "$OUT/" 2>/dev/null ;;
    env-ab)
      # A switch of the binding against the default, side by side in one call:
      # results/e2e/controls/decode_${AB_NAME}_{default,switched}.csv.
      build_kernels
      rc=0
      ab_side default . || rc=1
      ab_side switched . "${AB_ENV:?set AB_ENV}" || rc=1 ;;
    tree-ab)
      # This tree against $BASELINE_TREE, a carried copy of an earlier commit's any4lib and tinygemm_src (e.g. from
      # `git archive`; its commit in $AB_BASELINE_COMMIT), side by side in one call:
      # results/e2e/controls/decode_${AB_NAME}_{baseline,new}.csv.
      build_kernels
      rc=0
      ab_side baseline "${BASELINE_TREE:?set BASELINE_TREE}" ANY4_GIT_COMMIT="${AB_BASELINE_COMMIT:-unknown}" || rc=1
      ab_side new . || rc=1 ;;
    tests)
      timeout "${TESTS_LIMIT_S:-200}" python3 -m pytest -q -ra -p no:cacheprovider -m gpu tests/test_e2e.py tests/test_engine_gpu.py ${TESTS_K:+-k "$TESTS_K"} \
        2>&1 | tee "$OUT/tests.log"
      rc=${PIPESTATUS[0]} ;;
    reduce-overhead)
      # Cross-check of the default mode against torch.compile(mode="reduce-overhead") of the whole step, batch 1.
      limit=$(( ${CALL_LIMIT_S:-585} - SECONDS ))
      timeout "$limit" python3 -m any4lib.bench.e2e --model-config llama3-8b --formats bf16,any4 --peers "" \
        --batch 1 --prompt 512 --new 128 --compile reduce-overhead --reuse-budget-s 0 \
        --deadline-s $(( limit - 150 )) --out results/e2e/controls/decode_reduce_overhead.csv 2>&1 | tee "$OUT/reduce_overhead.log"
      rc=${PIPESTATUS[0]}
      cp results/e2e/controls/decode_reduce_overhead.csv "$OUT/" 2>/dev/null ;;
    *) echo "unknown step $step (profile, bench, qhead, sdpa-control, pdl-ab, swiglu-ab, env-ab, tree-ab, tests,"\
         "reduce-overhead)"; rc=2 ;;
  esac
  echo "== $step: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
done
exit $status
