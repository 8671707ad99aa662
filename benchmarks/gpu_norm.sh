#!/usr/bin/env bash
# The fused RMSNorm (models/kernels/rmsnorm.py, issue 13) on the lent GPU, as ONE call from the repository root
# (about 5 minutes), logs and JSONL under $OUT:
#   1. tests/test_rmsnorm_kernel.py whole (on CUDA its CPU-shaped tests run the compiled kernel against eager CUDA)
#      and the GPU tests of the code a decode step runs (generate, the engine, attention, the MoE dispatch), which
#      now take the fused norm by default;
#   2. bench_decode.py --engine --engine-only: graph and graph+nonorm (the same engine with RMSNorm.fused_inference
#      off: the peer row, same run), batch 1 and 32;
#   3. profile_decode.py: kernels per step and fused-norm launches, graph vs graph+nonorm, batch 1 and 32.
# Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_rmsnorm_kernel.py 2>&1 \
  | grep -v DEBUG | tail -15 > $OUT/norm_tests.log
timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  ${TESTS:-tests/test_generation.py tests/test_serve_engine.py tests/test_model_attention.py tests/test_model_moe.py} \
  2>&1 | grep -v DEBUG | tail -25 > $OUT/gpu_tests.log
tail -4 $OUT/norm_tests.log $OUT/gpu_tests.log; echo "tests $(( $(date +%s) - T0 )) s"
timeout ${T_DECODE:-200} python3 benchmarks/bench_decode.py --engine --engine-only --engine-modes ${MODES:-graph,graph+nonorm} \
  --batches ${BATCHES:-1,32} --repeats 1 --out $OUT/decode_norm.jsonl 2>&1 | grep -v -i warn > $OUT/decode_norm.log
grep "^| engine" $OUT/decode_norm.log; echo "decode $(( $(date +%s) - T0 )) s"
timeout ${T_PROFILE:-120} python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+nonorm \
  --out $OUT/profile_norm.jsonl > $OUT/profile_norm.log 2>&1
grep "^##" $OUT/profile_norm.log; echo "total $(( $(date +%s) - T0 )) s"
