"""Distributed pretraining on Ray or torchrun: streaming loader, store checkpoints, launcher, expert-load
tracking, evaluation and the ``run_pretrain`` library entry (see ``launcher``)."""
