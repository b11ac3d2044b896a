"""Grouped-query causal attention (Ainslie et al., 2023, GQA).

``softmax(q k^T / sqrt(Dh) + mask) v`` with K kv heads shared by groups of
G = H // K query heads, RoPE on q and k, and a causal, document-aware mask
from ``segment_ids``. The kernel is ``jax.nn.dot_product_attention``, which
lets XLA (or cuDNN on GPU) choose the fused implementation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import DTYPES
from moejax.layers.attention import ATTENTION
from moejax.layers.rope import apply_rope


def causal_segment_mask(segment_ids_BxT):
  """Bool [B, 1, T, T]: query t sees key s iff s <= t, same segment, segment > 0.

  Padding queries (segment 0) see themselves only, so their softmax stays
  finite; their outputs are never trained on.
  """
  t = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  valid_BxT = segment_ids_BxT > 0
  mask = causal_TxT & same_BxTxT & (valid_BxT[:, :, None] | jnp.eye(t, dtype=bool))
  return mask[:, None]


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.num_heads


@ATTENTION.register("dense")
class DenseAttention(nn.Module):
  """x_BxTxD -> y_BxTxD; q: [B,T,H,Dh], k/v: [B,T,K,Dh]."""

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    d, h, k, dh = x_BxTxD.shape[-1], cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    init = nn.initializers.normal(cfg.init_std)

    def proj(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdtype).astype(dtype)

    w_q_DxHxDh = proj("w_q", (d, h, dh), ("embed", "heads", "head_dim"))
    w_k_DxKxDh = proj("w_k", (d, k, dh), ("embed", "kv_heads", "head_dim"))
    w_v_DxKxDh = proj("w_v", (d, k, dh), ("embed", "kv_heads", "head_dim"))
    w_o_HxDhxD = proj("w_o", (h, dh, d), ("heads", "head_dim", "embed"))

    x = x_BxTxD.astype(dtype)
    q_BxTxHxDh = jnp.einsum("BTD,DHK->BTHK", x, w_q_DxHxDh)
    k_BxTxKxDh = jnp.einsum("BTD,DHK->BTHK", x, w_k_DxKxDh)
    v_BxTxKxDh = jnp.einsum("BTD,DHK->BTHK", x, w_v_DxKxDh)
    q_BxTxHxDh = apply_rope(q_BxTxHxDh, positions_BxT, cfg.rope_theta)
    k_BxTxKxDh = apply_rope(k_BxTxKxDh, positions_BxT, cfg.rope_theta)
    q_BxTxHxDh = nn.with_logical_constraint(q_BxTxHxDh, ("act_batch", "act_length", "act_heads", None))

    out_BxTxHxDh = jax.nn.dot_product_attention(
        q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask=causal_segment_mask(segment_ids_BxT))
    return jnp.einsum("BTHK,HKD->BTD", out_BxTxHxDh, w_o_HxDhxD)
