#!/usr/bin/env bash
# The serving engine's decode step on the lent GPU, this tree beside an older one IN THE SAME CALL, from the
# repository root (about 6 minutes), logs and JSONL under $OUT:
#   1. the GPU tests of the code a decode step runs (MoE dispatch, generate, the engine, attention; TESTS= to change);
#   2. bench_moe_decode.py (one MoE layer's routed experts at 1..10 tokens: grouped vs the fused kernels; MOE_SWEEP=1
#      adds block sizes), then bench_decode.py --engine --engine-only (graph and graph+compile, batch 1 and 32) on this
#      tree, the old one, and this tree with the fused routed experts off (TREES= to change);
#   3. profile_decode.py on this tree: kernels per step, GPU busy vs wall (batch 1 and 32, graph+compile).
# Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh) and the older tree as
# .gpu_old/moeflow (`mkdir -p .gpu_old && git archive <commit> --prefix=moeflow/ | tar x -C .gpu_old`).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
PYTHONPATH=/tmp/pkg:/tmp/site timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  ${TESTS:-tests/test_model_moe.py tests/test_generation.py tests/test_serve_engine.py tests/test_model_attention.py} \
  2>&1 | grep -v DEBUG | tail -25 > $OUT/gpu_tests.log
tail -6 $OUT/gpu_tests.log; echo "tests $(( $(date +%s) - T0 )) s"
if [ -f benchmarks/bench_moe_decode.py ] && [ -n "${MOE_BENCH:-1}" ]; then
  PYTHONPATH=/tmp/pkg:/tmp/site timeout ${T_MOE:-90} python3 benchmarks/bench_moe_decode.py ${MOE_SWEEP:+--sweep} \
    --out $OUT/moe_decode.jsonl 2>&1 | grep -v -i warn > $OUT/moe_decode.log; grep "^|" $OUT/moe_decode.log | tail -14
  echo "moe bench $(( $(date +%s) - T0 )) s"
fi
# a tree: new (this one, fused routed experts auto), new-unfused (this one, --moe-fused off), old (.gpu_old)
for tree in ${TREES:-new old new-unfused}; do
  P=/tmp/pkg; [ "$tree" = old ] && P=$PWD/.gpu_old
  FUSED=auto; [ "$tree" = new-unfused ] && FUSED=off
  PYTHONPATH=$P:/tmp/site timeout ${T_DECODE:-150} python3 $P/moeflow/benchmarks/bench_decode.py --engine --engine-only \
    --engine-modes ${MODES:-graph,graph+compile} --batches ${BATCHES:-1,32} --repeats 1 --out $OUT/decode_$tree.jsonl \
    $([ "$tree" = old ] || echo --moe-fused $FUSED) 2>&1 | grep -v -i warn >> $OUT/decode_$tree.log
  echo "== $tree $(( $(date +%s) - T0 )) s"; grep "^| engine" $OUT/decode_$tree.log | tail -4
done
PYTHONPATH=/tmp/pkg:/tmp/site timeout ${T_PROFILE:-100} python3 benchmarks/profile_decode.py --batches 1 32 \
  --modes graph+compile --out $OUT/profile.jsonl > $OUT/profile.log 2>&1
grep "^##" $OUT/profile.log; echo "total $(( $(date +%s) - T0 )) s"
