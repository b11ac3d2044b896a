"""Model assembly from the per-layer schedule."""

from moejax.models.transformer import Block, Transformer, build_model

__all__ = ["Block", "Transformer", "build_model"]
