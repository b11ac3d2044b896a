"""moejax: a JAX/Flax research framework for long-context sparse models."""

__version__ = "0.1.0"
