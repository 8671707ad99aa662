"""Distributed pretraining on Ray or torchrun: ``config`` (PretrainConfig), ``distributed`` (process group,
DDP/FSDP2), ``worker`` (the per-rank loop, resume/checkpoint helpers), ``ray_launch``, ``finalize``
(HF export, registration), ``launcher`` (``run_pretrain`` + the CLI); streaming loader, store
checkpoints, expert-load tracking, checkpoint evaluation."""
