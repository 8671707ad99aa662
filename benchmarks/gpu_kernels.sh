#!/usr/bin/env bash
# The fused decode kernels (issue 13) on the lent GPU, ONE call from the repository root, parts in priority order,
# each under its own timeout (what a part leaves under $OUT comes back even if a later one runs out of time):
#   1. their tests on CUDA (TESTS=, default every fused-kernel module; PYTEST_ARGS="-m gpu" for the gpu-marked ones
#      only; PYTEST_K="a or b" for pytest -k, kept as one argument): on CUDA the CPU-shaped tests run the compiled
#      kernels against eager CUDA's formula, the gpu tests check no sync, graph replay and the graphed engine ==
#      generate() with each kernel on;
#   2. bench_mla_decode.py (MICRO=1; SWEEP=1 adds key splits, key blocks and warps): one layer's absorbed attention,
#      formula vs kernel, eager and CUDA graph;
#   3. bench_decode.py --engine --engine-only over MODES (one engine row per mode flag set, same process: the peers of
#      one run), batch 1 and 32: graph (the defaults: norm, RoPE, cache write, cache step, router, router logits,
#      the shared-expert fold and the block boundary fused; the MLA attention not) and
#      graph+no<switch> / +<switch> for rope (RotaryEmbedding.fused_inference), cachewrite (MLA.fused_cache_write),
#      router (Router.fused_inference), routerlogits (Router.fused_logits: the logits in the router's launch), mla
#      (MLA.fused_decode_attention), vproj (with mla: MLA.fused_value_projection, the value up-projection in its
#      launches; default rows graph, graph+mla, graph+mla+novproj, graph+moeorder), moeorder
#      (RoutedExperts.fused_decode_order: the expert-major routing in one launch; batch 33-64: BATCHES=1,32,64),
#      boundary (MoETransformer.defer_residual_add: the block boundary's residual add in the next norm's launch), sharedfold (DeepSeekMoE.fused_shared), and several at once; MOE_FUSED=auto|on|off
#      sets the routed experts' fused decode path for every row (auto: the default);
#   4. profile_decode.py (PROFILE=1): kernels per step and each fused kernel's launches, the same modes.
# A switch is turned on by default (with the numbers, as RMSNorm.fused_inference was) where its row gains and its
# tests pass. Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
MODES=${MODES:-graph,graph+mla,graph+mla+novproj,graph+moeorder}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/device.txt
if [ -n "${TESTS-x}" ]; then
  timeout ${T_TESTS:-200} python3 -m pytest -v -p no:cacheprovider ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} -rf \
    --tb=short ${TESTS:-tests/test_rope_kernel.py \
    tests/test_mla_prep_kernel.py tests/test_router_kernel.py tests/test_mla_decode_kernel.py tests/test_moe_decode_kernel.py \
    tests/test_rmsnorm_kernel.py} 2>&1 | grep -v DEBUG > $OUT/kernel_tests_full.log
  # the summary; a part that ran out of time prints none, so then the names of the tests that failed so far
  # (-v prints each test's outcome as it ends; pytest prints the failures' details only at the end)
  tail -30 $OUT/kernel_tests_full.log > $OUT/kernel_tests.log
  grep -qE "^=+ .* in [0-9.]+s" $OUT/kernel_tests.log || { echo "(timed out; failed so far:)";
    grep -E " (FAILED|ERROR)" $OUT/kernel_tests_full.log | head -40; } >> $OUT/kernel_tests.log
  tail -6 $OUT/kernel_tests.log; el tests
fi
if [ -n "${MICRO:-}" ]; then
  timeout ${T_MICRO:-120} python3 benchmarks/bench_mla_decode.py ${SWEEP:+--sweep} --out $OUT/mla_micro.jsonl 2>&1 \
    | grep -v -i warn > $OUT/mla_micro.log
  grep "^|" $OUT/mla_micro.log; el micro
fi
timeout ${T_DECODE:-240} python3 benchmarks/bench_decode.py --engine --engine-only --engine-modes $MODES \
  --batches ${BATCHES:-1,32} --repeats 1 --moe-fused ${MOE_FUSED:-auto} --out $OUT/decode_kernels.jsonl 2>&1 \
  | grep -v -i warn > $OUT/decode_kernels.log
grep "^| engine" $OUT/decode_kernels.log; el decode
if [ -n "${PROFILE:-}" ]; then
  timeout ${T_PROFILE:-120} python3 benchmarks/profile_decode.py --batches 1 32 --modes ${MODES//,/ } \
    --out $OUT/profile_kernels.jsonl > $OUT/profile_kernels.log 2>&1
  grep "^##" $OUT/profile_kernels.log; el profile
fi
