"""Pretraining loop pieces: LR schedules, AdamW groups, the loop with its config, checkpoint state, metrics.

Pure PyTorch: no Ray, MLflow or object store here (those live in ``moeflow.platform.train``).
"""
