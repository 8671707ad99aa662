"""Evaluation maths and benchmarks: pure torch/numpy, no store, no services.

- ``passk``: the unbiased pass@k estimator.
- ``loglik``: batched log-likelihood of continuations and rolling log-likelihood of documents
  (padding- and batch-size-invariant), bits per byte.
- ``prompts``: multiple-choice and generative prompts (few-shot, plain or the one chat template).
- ``extract``: answer extraction (regex, last number) and exact match for generative tasks.
- ``lm``: ``ModelLM``, one object that scores and generates text for a model + tokenizer (used by
  our tasks and by the lm-eval-harness adapter).
- ``specialisation``: per-layer expert share by domain, mutual information, MaxVio.
- ``decontam``: 13-gram overlap between evaluation items and training text.
"""
