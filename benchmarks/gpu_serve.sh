#!/usr/bin/env bash
# Issue 13's GPU run, one call on the lent GPU, from the repo root (logs and JSONL under $OUT):
#   1. the GPU tests of the serving engine and generate (CUDA-graph decode == generate, token for token);
#   2. bench_decode.py: the serving engine alone (graph / eager, bf16 / INT8) at batch 1 and 32 with MBU,
#      INT8 vs bf16 perplexity, generate() and transformers generate as peers;
#   3. bench_serve.py http: the OpenAI API at 1/8/32/128 streams, ours (bf16 and INT8) and the
#      transformers-generate server behind the same gateway, one after the other in the same run.
# Needs: .whl with pydantic (+ core, annotated-types, typing-inspection, pydantic-settings, python-dotenv),
# fastapi 0.149.0, starlette 1.10.0, uvicorn 0.54.0, opentelemetry-api (the image lacks them; aiohttp,
# prometheus-client, transformers are there), and TOKENIZER=path of a byte-level BPE tokenizer.json with
# the model's 32,768 ids (so every generated id streams as text; made on the CPU with models.tokenizer.train_bpe).
set -u
WHL=${WHL:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHL/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch, transformers, sys; print('torch', torch.__version__, 'transformers', transformers.__version__, 'python', sys.version.split()[0])" | tee -a $OUT/device.txt
timeout ${T_TESTS:-150} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_serve_engine.py tests/test_generation.py 2>&1 | tail -15 | tee $OUT/gpu_tests.log
timeout ${T_DECODE:-240} python3 benchmarks/bench_decode.py --engine ${ENGINE_ONLY:+--engine-only} --int8 --impls "moeflow cached" --repeats 1 --ppl-seqs ${PPL_SEQS:-16} --ppl-len ${PPL_LEN:-240} \
  --out $OUT/decode.jsonl 2>&1 | grep -v Warning | tee $OUT/decode.log | tail -22
timeout ${T_HTTP:-330} python3 benchmarks/bench_serve.py http ${HTTP_INT8:+--int8} --tokenizer "$TOKENIZER" --duration ${DURATION:-8} --new ${NEW:-128} \
  --out $OUT/serve.jsonl 2>&1 | grep -v -e Warning -e "Loading weights" | tee $OUT/serve.log | tail -16
