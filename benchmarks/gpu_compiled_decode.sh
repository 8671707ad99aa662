#!/usr/bin/env bash
# The inductor-compiled engine step on the lent GPU (issue 13), ONE call from the repository root, rows in priority
# order, each under its own timeout (what a row leaves under $OUT comes back even if a later one runs out of time):
#   1. batch 1: graph+compile (the fused routed experts auto: slot-major at 1 token) with inductor's defaults, then
#      the same with TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 (inductor benchmarks Triton GEMM templates against cuBLAS for
#      every matmul of the step: the ~80 GEMVs of a batch-1 step are ~1/3 of its GPU time);
#   b1_mla / b32_mla: the same with the MLA decode attention kernel (MLA.fused_decode_attention) on;
#   2. batch 32: graph+compile with the fused routed experts auto (slot-major: 3 slots an expert) vs off (grouped);
#   3. g_auto / g_off: the DEFAULT (uncompiled) graph step at batch 1 and 32 with the fused routed experts auto vs
#      off (EngineConfig.fused_moe is off by default: these rows decide whether it can be auto).
# Each row is its own process (inductor settings and compiled caches do not leak between rows).
# Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
row() {  # row <name> <mode> <batches> <moe-fused> [ENV=VALUE ...]
  local name=$1 mode=$2 batches=$3 fused=$4; shift 4
  env "$@" timeout ${T_ROW:-150} python3 benchmarks/bench_decode.py --engine --engine-only --engine-modes $mode \
    --batches $batches --repeats 1 --moe-fused $fused --out $OUT/compiled_$name.jsonl 2>&1 | grep -v -i warn \
    > $OUT/compiled_$name.log
  grep "^| engine" $OUT/compiled_$name.log | sed "s/^/$name /"; el $name
}
for r in ${ROWS:-b1 b1_autotune b32_auto b32_off}; do
  case $r in
    b1) row b1 graph+compile 1 auto ;;
    b1_autotune) row b1_autotune graph+compile 1 auto TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 ;;
    b1_mla) row b1_mla graph+compile+mla 1 auto ;;
    b32_mla) row b32_mla graph+compile+mla 32 auto ;;
    b32_auto) row b32_auto graph+compile 32 auto ;;
    b32_off) row b32_off graph+compile 32 off ;;
    g_auto) row g_auto graph 1,32 auto ;;
    g_off) row g_off graph 1,32 off ;;
  esac
done
