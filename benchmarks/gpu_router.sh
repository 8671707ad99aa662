#!/usr/bin/env bash
# The fused router (models/kernels/router.py, issue 13) on the lent GPU, as ONE call from the repository root (about
# 4 minutes), logs and JSONL under $OUT:
#   1. tests/test_router_kernel.py whole (on CUDA its CPU-shaped tests run the compiled kernel against eager CUDA's
#      sigmoid/softmax bit for bit and the rest exactly; its gpu tests: eager CUDA's Router.forward bit for bit, CUDA
#      sum's shuffle order as kernels/router.py assumes (SUM_TREE), no sync, graph replay, the graphed engine ==
#      generate() with it on);
#   2. bench_decode.py --engine --engine-only: graph (the defaults: fused norm on, fused RoPE and router off) and
#      graph+router (the same engine with Router.fused_inference on: the peer row, same run), batch 1 and 32;
#   3. profile_decode.py: kernels per step and fused-router launches, graph vs graph+router, batch 1 and 32
#      (bench_ref: 7 fused launches a step replace 63 eager kernels).
# If the engine rows gain and the tests pass, turn Router.fused_inference on (models/moe.py) with the numbers, as
# RMSNorm's was. If only the SUM_TREE probe fails, flip kernels/router.py's SUM_TREE and rerun.
# Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_router_kernel.py 2>&1 \
  | grep -v DEBUG | tail -25 > $OUT/router_tests.log
tail -6 $OUT/router_tests.log; echo "tests $(( $(date +%s) - T0 )) s"
timeout ${T_DECODE:-200} python3 benchmarks/bench_decode.py --engine --engine-only \
  --engine-modes ${MODES:-graph,graph+router} --batches ${BATCHES:-1,32} --repeats 1 \
  --out $OUT/decode_router.jsonl 2>&1 \
  | grep -v -i warn > $OUT/decode_router.log
grep "^| engine" $OUT/decode_router.log; echo "decode $(( $(date +%s) - T0 )) s"
timeout ${T_PROFILE:-120} python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+router \
  --out $OUT/profile_router.jsonl > $OUT/profile_router.log 2>&1
grep "^##" $OUT/profile_router.log; echo "total $(( $(date +%s) - T0 )) s"
