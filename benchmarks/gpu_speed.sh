#!/usr/bin/env bash
# Issue 16 (training speed) GPU calls; run on the lent H200 from the folder that holds `moeflow/`
# (the repository, copied) and `whl/` (torchtitan 0.2.2 + tyro, docstring-parser, typeguard, torchdata,
# datasets, dill, multiprocess wheels: the image lacks them; `pip download --no-deps` as the README says).
# Writes everything under $OUT. IMPLS / FP8 / MOE / TEST select the parts.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD/moeflow" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $OUT/env.log
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/env.log
if [ -n "${TEST:-}" ]; then
  (cd moeflow && timeout ${TEST_S:-120} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_model_speed.py 2>&1 | tail -15 | tee $OUT/gpu_tests.log)
fi
if [ -n "${IMPLS:-}" ]; then
  timeout ${TRAIN_S:-420} python3 moeflow/benchmarks/bench_model.py --parts train --impls "$IMPLS" \
    ${PROFILE:+--profile $PROFILE --profile-out $OUT/profile.txt} --out $OUT/train.jsonl 2>&1 \
    | grep -v -i "warn" | tee $OUT/train.log | grep -v "^ *[A-Za-z_].*  *[0-9.]*%" | tail -40
fi
if [ -n "${FP8:-}" ]; then
  timeout ${FP8_S:-150} python3 moeflow/benchmarks/bench_fp8.py --out $OUT/fp8.jsonl 2>&1 | grep -v -i warn | tee $OUT/fp8.log | tail -14
fi
if [ -n "${MOE:-}" ]; then
  timeout ${MOE_S:-120} python3 moeflow/benchmarks/bench_model.py --parts moe --out $OUT/moe.jsonl 2>&1 | grep -v -i warn | tee $OUT/moe.log | tail -8
fi
