"""Evaluation engine: the sandbox, code benchmarks, task files, lm-eval adapter, reports, the evaluate stage."""
