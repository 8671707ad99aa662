#!/usr/bin/env bash
# The GPU measurements written on 2026-12-07 and not yet run (device time ran out), as ONE call on the lent GPU
# (about 8 minutes), from the repository root, logs and JSONL under $OUT:
#   1. the GPU tests never run on a GPU: the INT8 per-slot expert gather (no sync, graph replay, == grouped), the
#      INT8 CUDA-graph engine == generate, the engine in its own process on CUDA;
#   2. bench_int8_experts.py --device cuda --cuda-graph: one bench_ref MoE layer at 1..32 tokens, float vs INT8
#      whole stack vs INT8 per-slot (where the per-slot path pays, and the threshold T*K < E);
#   3. bench_decode.py --engine --int8: the INT8 engine at batch 1 and 32 beside bf16, perplexity;
#   4. bench_serve.py http --process-peer: the OpenAI API at 32 and 128 streams, the compiled-step server with its
#      engine in a thread (process=off) and in its own process (process=on; CUDA's default since), same run.
#    Measured 2026-12-07 on an H100: RESULTS.md, "The engine in its own process", GPU.
# Carry .whl (the pydantic / fastapi / uvicorn / pytest wheels of gpu_serve.sh) and bench_tokenizer.json.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
T=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
timeout ${T_TESTS:-120} python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short tests/test_quant.py \
  tests/test_serve_engine.py tests/test_serve_engine_proc.py -k "int8 or slot or process or peak" 2>&1 \
  | grep -v DEBUG | tail -20 | tee $OUT/gpu_tests.log
echo "tests: $(( $(date +%s) - T )) s" | tee -a $OUT/device.txt
timeout ${T_INT8:-60} python3 benchmarks/bench_int8_experts.py --device cuda --cuda-graph --tokens 1 2 4 8 10 11 16 32 \
  --out $OUT/int8_experts.jsonl 2>&1 | grep -v -i warn | tee $OUT/int8_experts.log | tail -14
timeout ${T_DECODE:-120} python3 benchmarks/bench_decode.py --engine --engine-only --int8 --impls "moeflow cached" \
  --engine-modes graph --repeats 1 --ppl-seqs 8 --ppl-len 128 --out $OUT/decode.jsonl 2>&1 | grep -v -i warn \
  | tee $OUT/decode.log | tail -8
echo "int8: $(( $(date +%s) - T )) s" | tee -a $OUT/device.txt
timeout ${T_HTTP:-200} python3 benchmarks/bench_serve.py http --compile yes --backends moeflow --process-peer \
  --levels ${LEVELS:-32,128} --tokenizer ${TOKENIZER:-bench_tokenizer.json} --duration ${DURATION:-3} --new 64 \
  --out $OUT/serve.jsonl 2>&1 | grep -v -e Warning -e "Loading weights" | tee $OUT/serve.log | tail -10
echo "total: $(( $(date +%s) - T )) s" | tee -a $OUT/device.txt
