"""Rotary position embeddings (Su et al., 2021, RoFormer)."""

import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jnp.ndarray:
  """Inverse frequencies ``theta^(-2i/Dh)`` for i < Dh/2, float32 [Dh/2]."""
  return 1.0 / theta ** (jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)


def apply_rope(x_BxTxHxDh, positions_BxT, theta: float):
  """Rotates channel pairs (i, i + Dh/2) by angle ``position * inv_freq[i]``.

  The "rotate-half" layout of GPT-NeoX / Llama / DeepSeek checkpoints.
  Computed in float32, returned in the input dtype.
  """
  head_dim = x_BxTxHxDh.shape[-1]
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * rope_frequencies(head_dim, theta)
  sin = jnp.sin(angles_BxTxF)[:, :, None, :]
  cos = jnp.cos(angles_BxTxF)[:, :, None, :]
  x = x_BxTxHxDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxDh.dtype)
