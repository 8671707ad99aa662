#!/usr/bin/env bash
# Issue 17: FSDP2-only vs expert parallelism x FSDP2 on the GPUs of ONE host (a multi-GPU kind), from the repo root.
# Needs .whl (pydantic wheels, as gpu_train.sh). No data: bench_parallel.py trains on random token rows.
# Runs the 1-GPU baseline, then every power of two up to the GPU count; about 1 min per launch on H100s.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpus.txt
NGPU=$(nvidia-smi -L | wc -l)
timeout 240 torchrun --nproc_per_node 1 benchmarks/bench_parallel.py --preset bench_ref --variants fsdp \
  --out $OUT/parallel.jsonl 2>&1 | grep -v Warning | tail -6 | tee -a $OUT/parallel.log
for n in 2 4 8; do
  [ "$n" -le "$NGPU" ] || break
  timeout 300 torchrun --nproc_per_node $n benchmarks/bench_parallel.py --preset bench_ref --variants fsdp,ep_fsdp \
    --out $OUT/parallel.jsonl 2>&1 | grep -v Warning | tail -8 | tee -a $OUT/parallel.log
  # pipeline: 2 stages (1F1B, 8 micro-batches of 8 x 2048 per replica), DP over the other n/2
  timeout 300 torchrun --nproc_per_node $n benchmarks/bench_parallel.py --preset bench_ref --variants pp --pp 2 \
    --micro 8 --out $OUT/parallel.jsonl 2>&1 | grep -v Warning | tail -4 | tee -a $OUT/parallel.log
done
