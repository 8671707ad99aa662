#!/usr/bin/env bash
# Issue 13's GPU run, ONE call on the lent GPU (about 7 minutes), from the repo root (logs and JSONL under $OUT,
# 7 files):
#   1. the GPU tests of the serving engine: CUDA-graph decode == generate (also with the engine in its own
#      process, tests/test_serve_engine_proc.py), and the COMPILED step in CUDA
#      graphs == generate, token for token (tests/test_serve_engine.py -m gpu);
#   2. bench_decode.py --engine --engine-compile: the serving engine alone at batch 1 and 32 with MBU,
#      rows "engine graph" (eager step captured), "engine graph+compile" (inductor step captured) and
#      "engine eager" (no graphs), same run;
#   3. bench_serve.py http: the OpenAI API at 1/8/32/128 streams, ours with the graph step and with the
#      compiled graph step (COMPILE=both) and the transformers-generate server behind the same gateway,
#      one after the other in the same run, with the server's CPU ms per token.
# Needs: .whl with pydantic (+ core, annotated-types, typing-inspection, pydantic-settings, python-dotenv),
# fastapi 0.149.0, starlette 1.10.0, uvicorn 0.54.0, opentelemetry-api (the image lacks them; aiohttp,
# prometheus-client, transformers are there), and TOKENIZER=path of a byte-level BPE tokenizer.json with
# the model's 32,768 ids (so every generated id streams as text; made on the CPU with models.tokenizer.train_bpe).
# INT8 rows: INT8=1 (adds ~1 min: engine INT8 rows, perplexity, INT8 HTTP server).
# MODES=graph,graph+sync,... picks the engine rows (+compile: inductor step, +sync: the engine's overlap off);
# OVERLAP_PEER=1 adds each bf16 HTTP server with the overlap off, SWITCH_PEER=MS one with a GIL switch interval of
# MS ms (EngineConfig.gil_switch_ms), same run; LEVELS=1,8,32,128 the stream counts.
# PROCESS_PEER=1 adds each bf16 HTTP server with the engine in its own process (EngineConfig.process), same run.
# SKIP_DECODE=1 skips step 2 (the HTTP comparison alone, after the GPU tests).
set -u
WHL=${WHL:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHL/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
# one inductor cache for the whole call: the tests, the engine rows and the HTTP server share compiled kernels
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_DIR=/tmp/triton
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch, transformers, sys; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', sys.version.split()[0])" | tee -a $OUT/device.txt
T=$(date +%s)
timeout ${T_TESTS:-90} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_serve_engine.py tests/test_serve_engine_proc.py tests/test_quant.py 2>&1 | tail -15 | tee $OUT/gpu_tests.log
echo "tests: $(( $(date +%s) - T )) s" | tee -a $OUT/device.txt
if [ -z "${SKIP_DECODE:-}" ]; then
timeout ${T_DECODE:-180} python3 benchmarks/bench_decode.py --engine --engine-only --engine-compile ${INT8:+--int8} --impls "moeflow cached" \
  ${MODES:+--engine-modes $MODES} \
  --repeats 1 --ppl-seqs ${PPL_SEQS:-8} --ppl-len ${PPL_LEN:-128} --out $OUT/decode.jsonl 2>&1 | grep -v Warning | tee $OUT/decode.log | tail -22
echo "decode: $(( $(date +%s) - T )) s" | tee -a $OUT/device.txt
fi
timeout ${T_HTTP:-180} python3 benchmarks/bench_serve.py http ${INT8:+--int8} --compile ${COMPILE:-both} --tokenizer "$TOKENIZER" \
  ${OVERLAP_PEER:+--overlap-peer} ${SWITCH_PEER:+--gil-switch-peer $SWITCH_PEER} ${PROCESS_PEER:+--process-peer} ${LEVELS:+--levels $LEVELS} \
  --duration ${DURATION:-3} --new ${NEW:-64} --out $OUT/serve.jsonl 2>&1 | grep -v -e Warning -e "Loading weights" | tee $OUT/serve.log | tail -20
echo "http: $(( $(date +%s) - T )) s" | tee -a $OUT/device.txt
