"""Small shared builders for tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.config import base_config
from moejax.layers.attention import ATTENTION
from moejax.layers.mlp import MLP


@ATTENTION.register("linear_test")
@MLP.register("linear_test")
class LinearSublayer(nn.Module):
  """x @ W, token by token: a stand-in for attention/MLP in tests of the
  residual wiring, which then has a closed-form per-token reference."""

  cfg: object

  @nn.compact
  def __call__(self, x_BxTxD, *unused):
    d = x_BxTxD.shape[-1]
    w_DxD = self.param("w", nn.initializers.normal(d ** -0.5), (d, d), jnp.float32)
    return x_BxTxD @ w_DxD


def tiny_model_cfg(**overrides) -> ml_collections.FrozenConfigDict:
  """A small model config (float32) with the given ``model.*`` overrides."""
  cfg = base_config().model
  cfg.update(dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, ffn_dim=64, vocab_size=64))
  cfg.update(overrides)
  return ml_collections.FrozenConfigDict(cfg)


def unboxed_init(module, *args):
  from flax.linen import meta

  return meta.unbox(module.init(jax.random.key(0), *args))


def np_rope(x_TxHxDh: np.ndarray, positions_T: np.ndarray, theta: float) -> np.ndarray:
  """RoPE by explicit 2x2 rotations of channel pairs (i, i + Dh/2), float64."""
  t, h, dh = x_TxHxDh.shape
  out = np.empty_like(x_TxHxDh, dtype=np.float64)
  half = dh // 2
  for i in range(half):
    angle = positions_T.astype(np.float64) * theta ** (-2.0 * i / dh)
    c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
    a, b = x_TxHxDh[:, :, i], x_TxHxDh[:, :, i + half]
    out[:, :, i] = a * c - b * s
    out[:, :, i + half] = b * c + a * s
  return out
