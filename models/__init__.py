"""The model side of moeflow: MoE transformer, tokenizer helpers, training step, losses, generation, metrics. Pure PyTorch/numpy."""

if __name__ != "moeflow.models":  # pragma: no cover - guard against 'import models' from the repo root
    raise ImportError("import moeflow.models, not the bare top-level 'models' package")

from .config import ModelConfig  # noqa: E402
from .transformer import ModelOutput, MoETransformer, compile_blocks  # noqa: E402

__all__ = ["ModelConfig", "MoETransformer", "ModelOutput", "compile_blocks"]
