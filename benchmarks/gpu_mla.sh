#!/usr/bin/env bash
# The fused absorbed-MLA decode attention (models/kernels/mla_decode.py, issue 13) on the lent GPU, as ONE call from
# the repository root (about 5 minutes), logs and JSONL under $OUT, each part under its own timeout:
#   1. tests/test_mla_decode_kernel.py whole (on CUDA its CPU-shaped tests run the compiled kernels against eager
#      CUDA's formula and float64; its gpu tests: no sync, graph replay, the graphed engine == generate() with it on;
#      the sm_90 compile report);
#   2. bench_mla_decode.py: one layer's call, formula vs kernel, eager and CUDA graph, B 1/8/32 x S 128/512/2048
#      (SWEEP=1 adds other key splits, key blocks and warps);
#   3. bench_decode.py --engine --engine-only: graph (the default: fused norm on, RoPE and MLA attention off) and
#      graph+mla (the same engine with MLA.fused_decode_attention on: the peer row, same run), batch 1 and 32
#      (MODES=graph,graph+rope,graph+rope+mla to stack it on the fused RoPE; graph+compile,graph+compile+mla for the
#      inductor step, where it runs as an opaque custom op: allow T_DECODE=400 for the compilations);
#   4. profile_decode.py: kernels per step and fused-MLA launches, graph vs graph+mla, batch 1 and 32.
# If the engine rows gain and the tests pass, turn MLA.fused_decode_attention on (models/attention.py) with the
# numbers, as RMSNorm's was.
# Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_mla_decode_kernel.py 2>&1 \
  | grep -v DEBUG | tail -15 > $OUT/mla_tests.log
tail -4 $OUT/mla_tests.log; echo "tests $(( $(date +%s) - T0 )) s"
timeout ${T_MICRO:-120} python3 benchmarks/bench_mla_decode.py ${SWEEP:+--sweep} --out $OUT/mla_micro.jsonl 2>&1 \
  | grep -v -i warn > $OUT/mla_micro.log
grep "^|" $OUT/mla_micro.log; echo "micro $(( $(date +%s) - T0 )) s"
timeout ${T_DECODE:-200} python3 benchmarks/bench_decode.py --engine --engine-only --engine-modes ${MODES:-graph,graph+mla} \
  --batches ${BATCHES:-1,32} --repeats 1 --out $OUT/decode_mla.jsonl 2>&1 | grep -v -i warn > $OUT/decode_mla.log
grep "^| engine" $OUT/decode_mla.log; echo "decode $(( $(date +%s) - T0 )) s"
timeout ${T_PROFILE:-120} python3 benchmarks/profile_decode.py --batches 1 32 --modes graph graph+mla \
  --out $OUT/profile_mla.jsonl > $OUT/profile_mla.log 2>&1
grep "^##" $OUT/profile_mla.log; echo "total $(( $(date +%s) - T0 )) s"
