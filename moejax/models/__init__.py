"""Model assembly from the per-layer schedule."""

from moejax.models.block import Block
from moejax.models.transformer import Hidden, Transformer, build_model

__all__ = ["Block", "Hidden", "Transformer", "build_model"]
