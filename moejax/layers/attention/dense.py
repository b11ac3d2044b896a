"""Grouped-query causal attention (Ainslie et al., 2023, GQA), and its options.

``softmax(q k^T / sqrt(Dh) + mask [+ sink]) v`` with K kv heads shared by
groups of G = H // K query heads, RoPE on q and k (partial with
``attention.rope_dim``: the leading channels, GPT-NeoX style; layout
``attention.rope_layout``; YaRN with ``attention.yarn``), optional per-head
QK RMSNorm (``attention.qk_norm``, Qwen3) and per-head attention sinks
(``attention.sinks``), and a causal, document-aware mask from
``segment_ids``. The kernel (``attention.implementation``,
``options.attention_kernel``) is one fused call with a [T, T] mask at short T
(``jax.nn.dot_product_attention`` through XLA or cuDNN, or tokamax's) and the
flash-style chunked kernel of ``core.py`` at long T.

Parameters: ``w_q [D, H, Dh]``, ``w_k``/``w_v [D, K, Dh]``, ``w_o [H, Dh, D]``
(HF ``q_proj``/``k_proj``/``v_proj``/``o_proj`` weights transposed and split
per head), ``q_norm``/``k_norm`` (``q_norm``/``k_norm``), ``sinks [H]``.
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from moejax.layers.attention import cache, context_parallel, core, options
from moejax.layers.attention.registry import ATTENTION
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import apply_rope


@ATTENTION.register("dense")
class DenseAttention(nn.Module):
  """x_BxTxD -> y_BxTxD; q: [B,T,H,Dh], k/v: [B,T,K,Dh]; every key up to the query."""

  rope_dim: ClassVar[bool] = True
  qk_norm: ClassVar[bool] = True
  library_kernels: ClassVar[bool] = True
  qk_clip_params: ClassVar[tuple[str, str]] = ("w_q", "w_k")

  cfg: ml_collections.FrozenConfigDict

  def window(self) -> int:
    return 0

  def cache_size(self, max_len: int) -> int:
    """Slots of the k/v ring: every position (dense) or the last ``window`` (sliding)."""
    return min(self.window() or max_len, max_len)

  def setup(self):
    cfg = self.cfg
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, options.head_dim(cfg)
    self.w_q = options.weight(self, "w_q", (d, h, dh), ("embed", "heads", "head_dim"))
    self.w_k = options.weight(self, "w_k", (d, k, dh), ("embed", "kv_heads", "head_dim"))
    self.w_v = options.weight(self, "w_v", (d, k, dh), ("embed", "kv_heads", "head_dim"))
    self.w_o = options.weight(self, "w_o", (h, dh, d), ("heads", "head_dim", "embed"))
    if cfg.attention.qk_norm:
      dtype, pdtype = options.dtypes(cfg)
      self.q_norm = RMSNorm(cfg.norm_eps, dtype, pdtype)
      self.k_norm = RMSNorm(cfg.norm_eps, dtype, pdtype)
    self.sinks_H = options.sinks(self, h) if cfg.attention.sinks else None
    self.rope = options.main_rope(cfg, dim=cfg.attention.rope_dim, part="leading")

  def project(self, x_BxTxD, positions_BxT):
    """q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh after norms and rope (what a kv cache stores)."""
    x = x_BxTxD.astype(self.w_q.dtype)
    q_BxTxHxDh = jnp.einsum("BTD,DHK->BTHK", x, self.w_q)
    k_BxTxKxDh = jnp.einsum("BTD,DHK->BTHK", x, self.w_k)
    v_BxTxKxDh = jnp.einsum("BTD,DHK->BTHK", x, self.w_v)
    if self.cfg.attention.qk_norm:
      q_BxTxHxDh, k_BxTxKxDh = self.q_norm(q_BxTxHxDh), self.k_norm(k_BxTxKxDh)
    q_BxTxHxDh = apply_rope(q_BxTxHxDh, positions_BxT, self.rope)
    k_BxTxKxDh = apply_rope(k_BxTxKxDh, positions_BxT, self.rope)
    q_BxTxHxDh = nn.with_logical_constraint(q_BxTxHxDh, ("act_batch", "act_length", "act_heads", None))
    return q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    a = self.cfg.attention
    q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh = self.project(x_BxTxD, positions_BxT)
    scale = q_BxTxHxDh.shape[-1] ** -0.5 * self.rope.softmax_scale
    out_BxTxHxDh, max_logit_H = context_parallel.causal_attention(
        q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDh, segment_ids_BxT, scale=scale, window=self.window(),
        sinks_H=self.sinks_H, kernel=options.attention_kernel(self.cfg, x_BxTxD.shape[1], self.library_kernels),
        block=options.flash_block(self.cfg), track_max_logit=a.track_max_logit)
    core.sow_max_logit(self, max_logit_H, a.track_max_logit)
    return jnp.einsum("BTHK,HKD->BTD", out_BxTxHxDh, self.w_o)

  @nn.compact
  def decode(self, x_BxCxD, positions_BxC, segment_ids_BxC, max_len: int):
    """x_BxCxD -> y_BxCxD with a k/v cache ``k``, ``v`` [B, S, K, Dh] (see ``cache.py``)."""
    a = self.cfg.attention
    step = cache.begin(self, segment_ids_BxC)
    q_BxCxHxDh, k_BxCxKxDh, v_BxCxKxDh = self.project(x_BxCxD, positions_BxC)
    size = self.cache_size(max_len)
    k_BxSxKxDh = cache.extend(self, "k", step, k_BxCxKxDh, size)
    v_BxSxKxDh = cache.extend(self, "v", step, v_BxCxKxDh, size)
    scale = q_BxCxHxDh.shape[-1] ** -0.5 * self.rope.softmax_scale
    out = cache.attend(q_BxCxHxDh, k_BxSxKxDh, v_BxSxKxDh, cache.visible(step, size, self.window()),
                       scale=scale, block=a.chunk_size)
    out_BxCxHxDh, _ = core.merge([out], self.sinks_H)
    return jnp.einsum("BTHK,HKD->BTD", out_BxCxHxDh, self.w_o)
