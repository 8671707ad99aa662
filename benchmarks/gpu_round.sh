#!/usr/bin/env bash
# One lent-GPU call for issues 16 and 13 together, from the repository root, each part under its own timeout
# (order = priority; what a part leaves under $OUT comes back even if a later one runs out of time):
#   1. GPU tests: the Triton AdamW, the fused RMSNorm and RoPE, the fused decode experts, the engine and generate
#      (TESTS=);
#   2. bench_adamw.py --graph: the optimizer step alone, torch fused vs ours (ADAMW_IMPLS=);
#   3. bench_model.py --parts train: torchtitan compiled beside our rows, same process (IMPLS=);
#   4. bench_decode.py --engine --engine-only: the default graph step with and without the fused norm, and with the
#      fused RoPE (off by default: graph+rope is its row) (DECODE_MODES=);
#   5. COMPILE_ROWS=1: the compiled engine step at batch 32, fused experts auto vs off.
# Carry .whl (pydantic/fastapi/uvicorn/pytest wheels, and torchtitan 0.2.2 + tyro, docstring-parser, typeguard,
# torchdata, datasets, dill, multiprocess for the peer).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton HF_HUB_OFFLINE=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
if [ -n "${TESTS-x}" ]; then
  timeout ${T_TESTS:-130} python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short ${TESTS:-tests/test_adamw_triton.py \
    tests/test_rmsnorm_kernel.py tests/test_rope_kernel.py tests/test_moe_decode_kernel.py \
    tests/test_serve_engine.py} 2>&1 | grep -v DEBUG | tail -30 \
    > $OUT/gpu_tests.log; tail -4 $OUT/gpu_tests.log; el tests
fi
if [ -n "${ADAMW_IMPLS-x}" ]; then
  timeout ${T_ADAMW:-60} python3 benchmarks/bench_adamw.py --graph --impls ${ADAMW_IMPLS:-fused,triton,triton_exact,compiled} \
    --out $OUT/adamw.jsonl 2>&1 | grep -v -i warn > $OUT/adamw.log; grep "^|" $OUT/adamw.log | tail -8; el adamw
fi
if [ -n "${IMPLS-x}" ]; then
  timeout ${T_TRAIN:-260} python3 benchmarks/bench_model.py --parts train --impls \
    "${IMPLS:-torchtitan,compiled+graph,compiled+graph+opt=triton,compiled+graph+opt=triton+ind.coordinate_descent_tuning=1,torchtitan}" \
    --out $OUT/train.jsonl 2>&1 | grep -v -i warn > $OUT/train.log; grep "^| train" $OUT/train.log; el train
fi
if [ -n "${DECODE_MODES-x}" ]; then
  timeout ${T_DECODE:-90} python3 benchmarks/bench_decode.py --engine --engine-only --engine-modes ${DECODE_MODES:-graph,graph+nonorm,graph+rope} \
    --batches 1,32 --repeats 1 --out $OUT/decode_norm.jsonl 2>&1 | grep -v -i warn > $OUT/decode_norm.log
  grep "^| engine" $OUT/decode_norm.log; el decode
fi
if [ -n "${COMPILE_ROWS:-}" ]; then
  for fused in auto off; do
    timeout ${T_COMPILE:-120} python3 benchmarks/bench_decode.py --engine --engine-only --engine-modes graph+compile --batches 32 \
      --repeats 1 --moe-fused $fused --out $OUT/decode_compile_$fused.jsonl 2>&1 | grep -v -i warn > $OUT/decode_compile_$fused.log
    grep "^| engine" $OUT/decode_compile_$fused.log; el compile $fused
  done
fi
