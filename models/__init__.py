"""The model side of moeflow: MoE transformer, tokenizer helpers, training step, losses, generation, metrics. Pure PyTorch/numpy.

The names below load on first use (PEP 562): ``moeflow.models.config`` holds no torch, so the CLI can
validate a recipe's model overrides without paying for ``import torch``.
"""

if __name__ != "moeflow.models":  # pragma: no cover - guard against 'import models' from the repo root
    raise ImportError("import moeflow.models, not the bare top-level 'models' package")

__all__ = ["ModelConfig", "MoETransformer", "ModelOutput", "compile_blocks"]


def __getattr__(name: str):
    if name == "ModelConfig":
        from .config import ModelConfig as value
    elif name in ("MoETransformer", "ModelOutput", "compile_blocks"):
        from . import transformer

        value = getattr(transformer, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
