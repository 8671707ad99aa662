#!/usr/bin/env bash
# One GPU call for the benchmarks that need no services: GRPO iteration beside TRL (issue 11), the reward step
# beside TRL's RewardTrainer (issue 10), document-masked attention and router precision costs (issue 9).
# Run from the repo root on the lent GPU with the wheels of .whl carried (pydantic, TRL, datasets; see gpu_train.sh).
# Each benchmark has its own time limit, so one that fails or overruns leaves the others' figures.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/moeflow
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=/tmp/pkg:/tmp/site MOEFLOW_HOME=/tmp/mfhome MOEFLOW_TRACKING=noop PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/machine.txt
python3 -c "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)" | tee -a $OUT/machine.txt
for part in ${PARTS:-grpo reward doc router}; do
  case "$part" in
    grpo)   timeout ${T_GRPO:-300} python3 benchmarks/bench_grpo.py ${GRPO_ARGS:---iters 2 --warmup 1} --out $OUT/grpo.jsonl ;;
    reward) timeout ${T_REWARD:-150} python3 benchmarks/bench_posttrain.py --only ours_reward,trl_reward --compile --out $OUT/reward.jsonl ;;
    doc)    timeout ${T_DOC:-120} python3 benchmarks/bench_doc_attention.py --compile --out $OUT/doc_attention.jsonl ;;
    router) timeout ${T_ROUTER:-60} python3 benchmarks/bench_router_precision.py --out $OUT/router.jsonl ;;
  esac 2>&1 | grep -v -i warning | tee $OUT/$part.log | tail -40
done
