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

MAX_LOGIT_BLOCK = 512  # query/key block of the max-logit scan: memory O(B * H * block^2)


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


def max_logit_per_head(q_BxTxHxDh, k_BxTxKxDh, segment_ids_BxT, block: int = MAX_LOGIT_BLOCK):
  """float32 [H]: each head's largest visible pre-softmax logit ``q.k / sqrt(Dh)``.

  Visible = the attention mask for real (segment > 0) queries. Blocks of
  ``block`` queries x ``block`` keys (``lax.scan`` over both), so [T, T] is
  never held; what QK-clip (Kimi K2) acts on. No gradient flows through it.
  """
  b, t, h, dh = q_BxTxHxDh.shape
  kv = k_BxTxKxDh.shape[2]
  block = min(block, t)
  n = -(-t // block)
  pad = n * block - t
  q = jnp.pad(jax.lax.stop_gradient(q_BxTxHxDh).astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  k = jnp.pad(jax.lax.stop_gradient(k_BxTxKxDh).astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)))  # padding rows: segment 0, never visible
  q_blocks = q.reshape(b, n, block, kv, h // kv, dh).swapaxes(0, 1)  # [n, B, block, K, G, Dh]
  k_blocks = k.reshape(b, n, block, kv, dh).swapaxes(0, 1)           # [n, B, block, K, Dh]
  seg_blocks = seg.reshape(b, n, block).swapaxes(0, 1)
  idx_blocks = jnp.arange(n * block).reshape(n, block)

  def over_queries(best_KxG, q_in):
    q_b, q_seg, q_idx = q_in

    def over_keys(best, k_in):
      k_b, k_seg, k_idx = k_in
      logits = jnp.einsum("BTKGD,BSKD->BKGTS", q_b, k_b) / jnp.sqrt(jnp.float32(dh))
      visible_BxTxS = ((q_idx[:, None] >= k_idx[None, :])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
                       & (q_seg[:, :, None] > 0))
      masked = jnp.where(visible_BxTxS[:, None, None], logits, -jnp.inf)
      return jnp.maximum(best, jnp.max(masked, axis=(0, 3, 4))), None

    best_KxG, _ = jax.lax.scan(over_keys, best_KxG, (k_blocks, seg_blocks, idx_blocks))
    return best_KxG, None

  init = jnp.full((kv, h // kv), -jnp.inf, jnp.float32)
  best_KxG, _ = jax.lax.scan(over_queries, init, (q_blocks, seg_blocks, idx_blocks))
  return best_KxG.reshape(h)


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

    if cfg.attention.track_max_logit:
      self.sow("max_stats", "max_logit", max_logit_per_head(q_BxTxHxDh, k_BxTxKxDh, segment_ids_BxT))
    out_BxTxHxDh = jax.nn.dot_product_attention(
        q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask=causal_segment_mask(segment_ids_BxT))
    return jnp.einsum("BTHK,HKD->BTD", out_BxTxHxDh, w_o_HxDhxD)
