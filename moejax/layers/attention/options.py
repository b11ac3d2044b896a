"""What the attention types read from ``model.attention``: ropes, kernel, parameters.

Kept in one place so every type resolves a config field the same way.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from moejax.layers import DTYPES
from moejax.layers.rope import Rope, Yarn


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads


def main_rope(cfg, dim: int = 0, part: str = "leading", layout: str | None = None) -> Rope:
  """The "main" rope: ``model.rope_theta`` with ``attention.yarn``."""
  a = cfg.attention
  return Rope(theta=float(cfg.rope_theta), dim=dim, layout=layout or a.rope_layout, part=part,
              yarn=Yarn.from_config(a.yarn))


def compress_rope(cfg, dim: int = 0, part: str = "trailing") -> Rope:
  """The rope of compressed layers (csa, hca): its own theta and YaRN (DeepSeek-V4 "compress")."""
  a = cfg.attention
  return Rope(theta=float(a.compress_rope_theta or cfg.rope_theta), dim=dim, layout=a.rope_layout, part=part,
              yarn=Yarn.from_config(a.compress_yarn))


def use_xla_kernel(cfg, seq_len: int) -> bool:
  """Whether dense-type attention runs through ``jax.nn.dot_product_attention``."""
  impl = cfg.attention.implementation
  return impl == "xla" or (impl == "auto" and seq_len <= cfg.attention.xla_max_len)


def dtypes(cfg):
  return DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]


def weight(module: nn.Module, name: str, shape, axes, init=None):
  """A parameter with logical axes (normal(init_std) unless ``init``), in the compute dtype."""
  dtype, pdtype = dtypes(module.cfg)
  init = init or nn.initializers.normal(module.cfg.init_std)
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), pdtype).astype(dtype)


def sinks(module: nn.Module, num_heads: int):
  """Per-head sink logits, float32 [H], initialised to 0 (as DeepSeek-V4)."""
  return module.param("sinks", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
                      (num_heads,), jnp.float32)
