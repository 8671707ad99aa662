"""The serving engine: continuous batching over the latent MLA cache (pure torch, see engine.py)."""

from .detok import TextStream
from .engine import Engine, EngineOverloaded, RequestError, check_request, SamplingParams, TokenOutput
from .slots import SlotCache

__all__ = ["Engine", "EngineOverloaded", "RequestError", "SamplingParams", "SlotCache", "TextStream", "TokenOutput",
           "check_request"]
