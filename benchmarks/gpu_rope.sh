#!/usr/bin/env bash
# The fused RoPE (models/kernels/rope.py, issue 13) on the lent GPU, as ONE call from the repository root (about
# 4 minutes), logs and JSONL under $OUT:
#   1. tests/test_rope_kernel.py whole (on CUDA its CPU-shaped tests run the compiled kernel against eager CUDA's
#      apply_rope, torch.equal; its gpu tests: no sync, graph replay, the graphed engine == generate() with it on);
#   2. bench_decode.py --engine --engine-only: graph (the default: fused norm on, fused RoPE off) and graph+rope
#      (the same engine with RotaryEmbedding.fused_inference on: the peer row, same run), batch 1 and 32;
#   3. profile_decode.py: kernels per step and fused-RoPE launches, graph vs graph+rope, batch 1 and 32
#      (bench_ref: 16 fused launches a step replace 144 eager kernels).
# If the engine rows gain and the tests pass, turn RotaryEmbedding.fused_inference on (models/layers.py) with the
# numbers, as RMSNorm's was.
# Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_rope_kernel.py 2>&1 \
  | grep -v DEBUG | tail -15 > $OUT/rope_tests.log
tail -4 $OUT/rope_tests.log; echo "tests $(( $(date +%s) - T0 )) s"
timeout ${T_DECODE:-200} python3 benchmarks/bench_decode.py --engine --engine-only --engine-modes ${MODES:-graph,graph+rope} \
  --batches ${BATCHES:-1,32} --repeats 1 --out $OUT/decode_rope.jsonl 2>&1 | grep -v -i warn > $OUT/decode_rope.log
grep "^| engine" $OUT/decode_rope.log; echo "decode $(( $(date +%s) - T0 )) s"
timeout ${T_PROFILE:-120} python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+rope \
  --out $OUT/profile_rope.jsonl > $OUT/profile_rope.log 2>&1
grep "^##" $OUT/profile_rope.log; echo "total $(( $(date +%s) - T0 )) s"
