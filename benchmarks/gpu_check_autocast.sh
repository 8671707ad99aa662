#!/usr/bin/env bash
# GPU check: the model's GPU-only tests, and bench_ref training-loop throughput with fp32 master
# weights + bf16 autocast (param_dtype fp32, the default) beside bf16 weights, in one call.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
TOK="file://$PWD/.gpudata/store/$(cat .gpudata/tokens_uri.txt)"
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_model_moe.py -m gpu 2>&1 | tail -3
for pd in fp32 bf16; do
  PARAM_DTYPE=$pd timeout 200 python3 benchmarks/bench_train.py throughput --tokens-uri "$TOK" --steps 25 \
    --param-dtype $pd --out $OUT/autocast.jsonl 2>&1 | grep -v -i warn | tail -3
done
