#!/usr/bin/env bash
# Issue 5 GPU experiments through the training path; run on the lent GPU from the repo root.
# Needs: .whl (pydantic wheels, the image lacks them) and the stdlib token shards under .gpudata/
# (made here on the CPU by `python benchmarks/make_gpu_data.py`). The wheels: `pip download --no-deps
# --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl` pydantic, pydantic-core,
# annotated-types, typing-inspection, pydantic-settings, python-dotenv (versions from constraints.txt).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TOK="file://$PWD/.gpudata/store/$(cat .gpudata/tokens_uri.txt)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
case "$1" in
  single)
    timeout 200 python3 benchmarks/bench_train.py throughput --tokens-uri "$TOK" --steps 30 --out $OUT/train.jsonl 2>&1 | tail -25 | tee $OUT/throughput.log
    timeout 330 python3 benchmarks/bench_train.py compare --tokens-uri "$TOK" --preset small --steps ${STEPS:-300} \
      --seq-len 1024 --batch 16 --lr 2e-3 --eager --out $OUT/train.jsonl 2>&1 | grep -v Warning | tail -25 | tee $OUT/compare.log ;;
  scaling)
    for n in 1 2; do
      timeout 250 torchrun --nproc_per_node $n benchmarks/bench_train.py scaling --tokens-uri "$TOK" --steps 30 \
        --out $OUT/scaling.jsonl 2>&1 | tail -8 | tee -a $OUT/scaling.log
    done ;;
esac
