"""Post-training engines: data (chat / preference / prompt JSONL and the built-in generated sets), the shared
engine core (``engine``: start from a model version, train on the pretraining launch path, resume, export,
register), and the stages built on it (``sft``; reward, align and distill beside it)."""
