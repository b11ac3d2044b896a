"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434; DeepSeek-V3).

Queries: ``q = rmsnorm(x W_qa) W_qb`` (low rank, ``attention.q_lora_rank > 0``)
or ``q = x W_q``; each head is ``[q_nope (Dn) | q_rope (Dr)]``. Keys/values
come from one compressed latent per token: ``[c | k_rope] = x W_kva``, ``c =
rmsnorm(c)`` (``kv_lora_rank`` R), ``[k_nope | v] = c W_kvb`` per head, and a
rope key ``k_rope`` shared by all heads (the "decoupled" rope part; layout
``attention.rope_layout``, DeepSeek-V3 checkpoints use "interleave"). Logits
``(q_nope k_nope + q_rope k_rope) * scale`` with ``scale = (Dn+Dr)^-0.5 *
mscale^2`` (YaRN ``mscale_all_dim``).

Two equivalent cores over the same projections (:meth:`MLAttention.project`):

* naive (training, prefill): expand c into per-head k, v — ``[B,T,H,Dn+Dr]``;
* absorbed (decoding, DSA's sparse path): fold ``W_kvb``'s key half into the
  query, ``q_lat = q_nope W_uk^T`` [H, R], attend MQA-style over the latent
  keys ``[c | k_rope]`` with values ``c``, then apply ``W_kvb``'s value half
  — so a kv cache holds only ``R + Dr`` numbers per token.

Parameter names -> HF ``DeepseekV3Attention``: ``w_q_a`` = q_a_proj.T,
``q_a_norm`` = q_a_layernorm, ``w_q_b [R_q, H, Dn+Dr]`` = q_b_proj.T reshaped,
``w_q`` = q_proj.T reshaped (no q lora), ``w_kv_a`` = kv_a_proj_with_mqa.T,
``kv_a_norm`` = kv_a_layernorm, ``w_kv_b [R, H, Dn+Dv]`` = kv_b_proj.T
reshaped, ``w_o [H, Dv, D]`` = o_proj.T reshaped.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers.attention import cache, context_parallel, core, options
from moejax.layers.attention.registry import ATTENTION
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import apply_rope


class MLAProjection(NamedTuple):
  """What MLA computes per token before attention (a decode cache keeps c and k_rope)."""

  q_nope_BxTxHxDn: jax.Array
  q_rope_BxTxHxDr: jax.Array   # rotated
  c_BxTxR: jax.Array           # normalised kv latent
  k_rope_BxTxDr: jax.Array     # rotated, shared by all heads
  q_resid_BxTxRq: jax.Array | None  # normalised low-rank query (the DSA indexer reads it)


@ATTENTION.register("mla")
class MLAttention(nn.Module):
  """x_BxTxD -> y_BxTxD: DeepSeek-V3 MLA over all previous keys (see module doc)."""

  latent_kv: ClassVar[bool] = True

  cfg: ml_collections.FrozenConfigDict

  def setup(self):
    cfg, a = self.cfg, self.cfg.attention
    d, h = cfg.d_model, cfg.num_heads
    dn, dr, dv, r = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    dtype, pdtype = options.dtypes(cfg)
    if a.q_lora_rank:
      self.w_q_a = options.weight(self, "w_q_a", (d, a.q_lora_rank), ("embed", "lora"))
      self.q_a_norm = RMSNorm(cfg.norm_eps, dtype, pdtype)
      self.w_q_b = options.weight(self, "w_q_b", (a.q_lora_rank, h, dn + dr), ("lora", "heads", "head_dim"))
    else:
      self.w_q = options.weight(self, "w_q", (d, h, dn + dr), ("embed", "heads", "head_dim"))
    self.w_kv_a = options.weight(self, "w_kv_a", (d, r + dr), ("embed", "lora"))
    self.kv_a_norm = RMSNorm(cfg.norm_eps, dtype, pdtype)
    self.w_kv_b = options.weight(self, "w_kv_b", (r, h, dn + dv), ("lora", "heads", "head_dim"))
    self.w_o = options.weight(self, "w_o", (h, dv, d), ("heads", "head_dim", "embed"))
    self.sinks_H = options.sinks(self, h) if a.sinks else None
    self.rope = options.main_rope(cfg, dim=dr, part="trailing")
    self.scale = (dn + dr) ** -0.5 * self.rope.softmax_scale

  def project(self, x_BxTxD, positions_BxT) -> MLAProjection:
    a = self.cfg.attention
    x = x_BxTxD.astype(self.w_kv_a.dtype)
    q_resid = None
    if a.q_lora_rank:
      q_resid = self.q_a_norm(jnp.einsum("BTD,DR->BTR", x, self.w_q_a))
      q_BxTxHxDh = jnp.einsum("BTR,RHd->BTHd", q_resid, self.w_q_b)
    else:
      q_BxTxHxDh = jnp.einsum("BTD,DHd->BTHd", x, self.w_q)
    q_BxTxHxDh = nn.with_logical_constraint(q_BxTxHxDh, ("act_batch", "act_length", "act_heads", None))
    q_rope = apply_rope(q_BxTxHxDh[..., a.qk_nope_head_dim:], positions_BxT, self.rope)
    kv_a_BxTxDk = jnp.einsum("BTD,Dk->BTk", x, self.w_kv_a)
    c_BxTxR = self.kv_a_norm(kv_a_BxTxDk[..., :a.kv_lora_rank])
    k_rope_BxTxDr = apply_rope(kv_a_BxTxDk[..., a.kv_lora_rank:], positions_BxT, self.rope)
    return MLAProjection(q_BxTxHxDh[..., :a.qk_nope_head_dim], q_rope, c_BxTxR, k_rope_BxTxDr, q_resid)

  def expand(self, p: MLAProjection):
    """Naive form: per-head q, k [B,T,H,Dn+Dr] and v [B,T,H,Dv]."""
    dn = self.cfg.attention.qk_nope_head_dim
    kv_BxTxHxDnv = jnp.einsum("BTR,RHc->BTHc", p.c_BxTxR, self.w_kv_b)  # Dnv = Dn + Dv
    k_rope = jnp.broadcast_to(p.k_rope_BxTxDr[:, :, None, :], kv_BxTxHxDnv.shape[:3] + p.k_rope_BxTxDr.shape[-1:])
    q = jnp.concatenate([p.q_nope_BxTxHxDn, p.q_rope_BxTxHxDr], axis=-1)
    k = jnp.concatenate([kv_BxTxHxDnv[..., :dn], k_rope], axis=-1)
    return q, k, kv_BxTxHxDnv[..., dn:]

  def absorb_query(self, q_nope_BxTxHxDn, q_rope_BxTxHxDr):
    """Absorbed query ``[q_nope W_uk^T | q_rope]``: [B, T, H, R + Dr] against latent keys."""
    w_uk_RxHxDn = self.w_kv_b[..., :self.cfg.attention.qk_nope_head_dim]
    return jnp.concatenate([jnp.einsum("BTHn,RHn->BTHR", q_nope_BxTxHxDn, w_uk_RxHxDn), q_rope_BxTxHxDr], -1)

  def latent_keys(self, p: MLAProjection):
    """The MQA keys of the absorbed form, [B, T, R + Dr] (what a decode cache stores)."""
    return jnp.concatenate([p.c_BxTxR, p.k_rope_BxTxDr], axis=-1)

  def unabsorb_output(self, out_BxTxHxR):
    """Latent attention output -> per-head values: ``out W_uv`` [B, T, H, Dv]."""
    w_uv_RxHxDv = self.w_kv_b[..., self.cfg.attention.qk_nope_head_dim:]
    return jnp.einsum("BTHR,RHv->BTHv", out_BxTxHxR, w_uv_RxHxDv)

  def output(self, out_BxTxHxDv):
    return jnp.einsum("BTHv,HvD->BTD", out_BxTxHxDv, self.w_o)

  def dense_core(self, p: MLAProjection, segment_ids_BxT, absorbed: bool = False):
    """Causal attention over all previous keys: (out_BxTxHxDv, max_logit_H)."""
    a = self.cfg.attention
    kw = dict(scale=self.scale, sinks_H=self.sinks_H, block=options.flash_block(self.cfg), track_max_logit=a.track_max_logit,
              kernel=options.attention_kernel(self.cfg, segment_ids_BxT.shape[1]))
    if not absorbed:
      q, k, v = self.expand(p)
      return context_parallel.causal_attention(q, k, v, segment_ids_BxT, **kw)
    keys_BxTx1xDk = self.latent_keys(p)[:, :, None, :]
    out_BxTxHxR, max_logit = context_parallel.causal_attention(
        self.absorb_query(p.q_nope_BxTxHxDn, p.q_rope_BxTxHxDr), keys_BxTx1xDk, p.c_BxTxR[:, :, None, :],
        segment_ids_BxT, **kw)
    return self.unabsorb_output(out_BxTxHxR), max_logit

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, absorbed: bool = False):
    out_BxTxHxDv, max_logit_H = self.dense_core(self.project(x_BxTxD, positions_BxT), segment_ids_BxT, absorbed)
    core.sow_max_logit(self, max_logit_H, self.cfg.attention.track_max_logit)
    return self.output(out_BxTxHxDv)

  def decode_step(self, x_BxCxD, positions_BxC, segment_ids_BxC, max_len: int):
    """(step, projection, latent keys [B, S + C, R + Dr] = ``[cache | chunk]``); caches ``latent``."""
    step = cache.begin(self, segment_ids_BxC)
    p = self.project(x_BxCxD, positions_BxC)
    return step, p, cache.extend(self, "latent", step, self.latent_keys(p), max_len)

  def absorbed_dense(self, p: MLAProjection, keys_BxSxDk, valid_BxCxS):
    """Absorbed MLA over the visible latent keys, sinks included: out_BxCxHxDv."""
    r = self.cfg.attention.kv_lora_rank
    out = cache.attend(self.absorb_query(p.q_nope_BxTxHxDn, p.q_rope_BxTxHxDr), keys_BxSxDk[:, :, None],
                       keys_BxSxDk[:, :, None, :r], valid_BxCxS, scale=self.scale, block=self.cfg.attention.chunk_size)
    out_BxCxHxR, _ = core.merge([out], self.sinks_H)
    return self.unabsorb_output(out_BxCxHxR)

  @nn.compact
  def decode(self, x_BxCxD, positions_BxC, segment_ids_BxC, max_len: int):
    """x_BxCxD -> y_BxCxD, absorbed, with the latent cache ``latent`` [B, S, R + Dr] (``cache.py``)."""
    step, p, keys_BxSxDk = self.decode_step(x_BxCxD, positions_BxC, segment_ids_BxC, max_len)
    return self.output(self.absorbed_dense(p, keys_BxSxDk, cache.visible(step, max_len)))
