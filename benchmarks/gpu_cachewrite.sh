#!/usr/bin/env bash
# The fused MLA cache step (models/kernels/mla_prep.py, MLA.fused_cache_write, issue 13) on the lent GPU, as ONE call
# from the repository root (about 5 minutes), logs and JSONL under $OUT:
#   1. tests/test_mla_prep_kernel.py whole (on CUDA its CPU-shaped tests run the compiled kernel against the unfused
#      path with the fused RMSNorm, torch.equal of the cache and the query; its gpu tests: no sync, graph replay, the
#      graphed engine == generate() and == the engine with it off);
#   2. bench_decode.py --engine --engine-only: graph (the default: fused norm on, fused RoPE off, cache write off) and
#      graph+cachewrite (the same engine with MLA.fused_cache_write on: the peer row, same run), then graph+rope and
#      graph+rope+cachewrite, batch 1 and 32;
#   3. profile_decode.py: kernels per step and fused cache-write launches, the same four modes, batch 1 and 32
#      (bench_ref: 8 launches a step replace 168 with eager RoPE, 40 with the fused RoPE).
# If the engine rows gain and the tests pass, turn MLA.fused_cache_write on (models/attention.py) with the numbers.
# Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
MODES=${MODES:-graph,graph+cachewrite,graph+rope,graph+rope+cachewrite}
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_mla_prep_kernel.py 2>&1 \
  | grep -v DEBUG | tail -15 > $OUT/cachewrite_tests.log
tail -4 $OUT/cachewrite_tests.log; echo "tests $(( $(date +%s) - T0 )) s"
timeout ${T_DECODE:-240} python3 benchmarks/bench_decode.py --engine --engine-only --engine-modes $MODES \
  --batches ${BATCHES:-1,32} --repeats 1 --out $OUT/decode_cachewrite.jsonl 2>&1 | grep -v -i warn > $OUT/decode_cachewrite.log
grep "^| engine" $OUT/decode_cachewrite.log; echo "decode $(( $(date +%s) - T0 )) s"
timeout ${T_PROFILE:-120} python3 benchmarks/profile_decode.py --batches 1 32 --modes ${MODES//,/ } \
  --out $OUT/profile_cachewrite.jsonl > $OUT/profile_cachewrite.log 2>&1
grep "^##" $OUT/profile_cachewrite.log; echo "total $(( $(date +%s) - T0 )) s"
