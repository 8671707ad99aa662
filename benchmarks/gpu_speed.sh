#!/usr/bin/env bash
# Issue 16 (training speed) GPU calls; run on the lent GPU from the folder that holds `moeflow/`
# (the repository, copied), `whl/` (pydantic + pydantic-settings wheels for the training path; torchtitan
# 0.2.2 + tyro, docstring-parser, typeguard, torchdata, datasets, dill, multiprocess for the peer: the image
# lacks them; `pip download --no-deps` as the README says) and, for LOOP / CONV, `data/` (the token store
# of `benchmarks/make_gpu_data.py`: data/store/datasets/stdlib/tokens/<key>, key in data/tokens_uri.txt).
# Writes everything under $OUT. Parts (each under its own timeout, so one failure leaves the others):
#   TEST=1       pytest -m gpu tests/test_model_speed.py tests/test_train_speed_options.py
#   GROUPED=1    bench_fp8.py --grouped-only (routed experts' grouped GEMMs, bf16 vs FP8)
#   FP8=1        bench_fp8.py (every linear shape, then the grouped GEMMs)
#   LOOP=v1,v2   bench_train.py speed: bench_ref through the real training loop, PretrainConfig variants
#   CONV=v1,v2   bench_train.py compare: bench_ref from one init on the same tokens, CONV_STEPS steps each
#   IMPLS=...    bench_model.py --parts train (ours vs torchtitan vs transformers, same process)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD/moeflow" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $OUT/env.log
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, hasattr(torch, '_scaled_grouped_mm'))" | tee -a $OUT/env.log
TOK="file://$PWD/data/store/$(cat data/tokens_uri.txt 2>/dev/null)"
if [ -n "${TEST:-}" ]; then
  (cd moeflow && timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/test_model_speed.py \
    tests/test_train_speed_options.py 2>&1 | grep -v "^DEBUG" | tail -60 | tee $OUT/gpu_tests.log)
fi
if [ -n "${GROUPED:-}${FP8:-}" ]; then
  timeout ${FP8_S:-150} python3 moeflow/benchmarks/bench_fp8.py ${GROUPED:+--grouped-only} --out $OUT/fp8.jsonl 2>&1 \
    | grep -v -i -e warn -e "^DEBUG" | tee $OUT/fp8.log | tail -16
fi
if [ -n "${LOOP:-}" ]; then
  timeout ${LOOP_S:-240} python3 moeflow/benchmarks/bench_train.py speed --tokens-uri "$TOK" --variants "$LOOP" \
    --steps ${LOOP_STEPS:-30} --batch ${LOOP_B:-8} --log-every 5 --out $OUT/loop.jsonl 2>&1 | grep -v -i -e warn -e "^DEBUG" \
    | tee $OUT/loop.log | tail -12
fi
if [ -n "${CONV:-}" ]; then
  timeout ${CONV_S:-300} python3 moeflow/benchmarks/bench_train.py compare --tokens-uri "$TOK" --preset bench_ref \
    --variants "$CONV" --steps ${CONV_STEPS:-1000} --seq-len ${CONV_SEQ:-1024} --batch ${CONV_B:-8} --lr 1e-3 --log-every 10 \
    --out $OUT/conv.jsonl 2>&1 | grep -v -i -e warn -e "^DEBUG" | tee $OUT/conv.log | tail -8
fi
if [ -n "${IMPLS:-}" ]; then
  timeout ${TRAIN_S:-420} python3 moeflow/benchmarks/bench_model.py --parts train --impls "$IMPLS" \
    ${PROFILE:+--profile $PROFILE --profile-out $OUT/profile.txt} --out $OUT/train.jsonl 2>&1 \
    | grep -v -i "warn" | tee $OUT/train.log | grep -v "^ *[A-Za-z_].*  *[0-9.]*%" | tail -40
fi
