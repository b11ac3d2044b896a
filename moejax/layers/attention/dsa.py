"""DeepSeek sparse attention (DeepSeek-V3.2, arXiv:2512.02556): MLA + lightning indexer top-k.

Each query attends (MLA, absorbed form: MQA over the ``R + Dr`` latent keys)
only to the ``index_topk`` previous tokens of its document that the
lightning indexer (``indexer.py``, :class:`TokenIndexer`) scores highest.
Queries are processed ``chunk`` rows at a time: indexer scores [chunk, T],
top-k, gather [chunk, k, R + Dr], attention — so memory is O(T * k) plus one
chunk, and attention compute O(T * k) (the indexer itself is O(T^2) but with
a few narrow ReLU heads). ``indexer_stage`` selects warm-up (dense MLA
attention, indexer KL over all keys), sparse (KL on the selected keys) or
off. With ``index_topk >= T`` it is exactly dense MLA.

Parameters: those of ``mla`` (requires ``q_lora_rank > 0``) plus
``indexer/{w_q_b, w_weights, w_k, k_norm}`` (HF ``self_attn.indexer.{wq_b,
weights_proj, wk, k_norm}``).
"""

from typing import ClassVar

import jax
import jax.numpy as jnp

import flax.linen as nn

from moejax.layers.attention import cache, context_parallel, core, indexer, options
from moejax.layers.attention.mla import MLAProjection, MLAttention
from moejax.layers.attention.registry import ATTENTION


@ATTENTION.register("dsa")
class DSAttention(MLAttention):
  """x_BxTxD -> y_BxTxD: MLA over each query's indexer-selected top-k previous tokens."""

  needs_q_lora: ClassVar[bool] = True
  indexed: ClassVar[bool] = True

  @staticmethod
  def validate_config(cfg) -> list[str]:
    return indexer.check_rope(cfg.model.attention, "dsa", cfg.model.attention.qk_rope_head_dim)

  def setup(self):
    super().setup()
    rope = options.main_rope(self.cfg, dim=self.cfg.attention.qk_rope_head_dim, part="leading", layout="half")
    self.indexer = indexer.TokenIndexer(self.cfg, rope)

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    a = self.cfg.attention
    p = self.project(x_BxTxD, positions_BxT)
    sg = jax.lax.stop_gradient  # the indexer learns from its KL only
    q_i, w_i, k_i = self.indexer(sg(x_BxTxD), sg(p.q_resid_BxTxRq), positions_BxT)
    top = min(a.index_topk, x_BxTxD.shape[1])
    if a.indexer_stage == "warmup":
      out_BxTxHxDv, max_logit_H = self.dense_core(p, segment_ids_BxT)
      sums = self._warmup_kl(p, q_i, w_i, k_i, segment_ids_BxT)
    else:
      t = segment_ids_BxT.shape[1]
      idx_T = jnp.arange(t)
      out_BxTxHxDv, sums = self.sparse_core(
          p, q_i, w_i, self.latent_keys(p), k_i, jnp.broadcast_to(idx_T, segment_ids_BxT.shape), segment_ids_BxT,
          idx_T, segment_ids_BxT, top, a.indexer_stage == "sparse")
      max_logit_H = sums.pop("max_logit")
    core.sow_max_logit(self, max_logit_H, a.track_max_logit)
    recall = self._recall(p, q_i, w_i, k_i, segment_ids_BxT, top) if indexer.wants_recall(self) else None
    indexer.sow_training(self, sums, recall)
    return self.output(out_BxTxHxDv)

  def sparse_core(self, p: MLAProjection, q_i, w_i, keys_BxSxDk, k_i_BxSxI, q_idx_BxT, segment_ids_BxT,
                  k_idx_S, k_seg_BxS, top: int, with_kl: bool):
    """(out_BxTxHxDv, sums): absorbed MLA over the top-``top`` keys, a query chunk at a time.

    Keys (latent ``[c | k_rope]`` and indexer keys) are indexed by ``k_idx``
    ([S] or, from a decode cache, [B, S]) in documents ``k_seg``; queries by
    ``q_idx_BxT`` in ``segment_ids_BxT`` (``core.visible``).
    """
    r = self.cfg.attention.kv_lora_rank
    sg = jax.lax.stop_gradient

    def chunk(_, xs, seg_BxQ, shared):
      q_nope, q_rope, q_i_c, w_i_c, q_idx_BxQ = xs
      keys_BxSxDk, k_i_BxSxI, k_seg_BxS = shared  # all-gathered over context (context_parallel.py)
      valid_BxQxS = core.visible(q_idx_BxQ, k_idx_S, seg_BxQ, k_seg_BxS)
      idx, ok = indexer.top_k(indexer.scores(sg(q_i_c), sg(w_i_c), sg(k_i_BxSxI)), valid_BxQxS, top)
      keys_BxQxSxDk = indexer.gather(keys_BxSxDk, idx)
      logits = jnp.einsum("BQHk,BQSk->BQHS", self.absorb_query(q_nope, q_rope), keys_BxQxSxDk,
                          preferred_element_type=jnp.float32) * self.scale
      out, lse, max_logit = core.masked_attention(logits, keys_BxQxSxDk[..., :r], ok, "BQS")
      if self.sinks_H is not None:
        out, lse = core.merge([(out, lse)], self.sinks_H)
      sums = {"max_logit": max_logit}
      if with_kl:
        index_sel = indexer.gathered_scores(q_i_c, w_i_c, indexer.gather(k_i_BxSxI, idx))
        sums.update(indexer.kl_to_main(logits, lse, index_sel, ok, seg_BxQ > 0))
      return self.unabsorb_output(out.astype(keys_BxSxDk.dtype)), sums

    per_query = (p.q_nope_BxTxHxDn, p.q_rope_BxTxHxDr, q_i, w_i, q_idx_BxT)
    rows = core.chunk_rows(self.cfg.attention.chunk_size, keys_BxSxDk.shape[1])
    return context_parallel.map_query_chunks(chunk, rows, per_query, segment_ids_BxT, (keys_BxSxDk, k_i_BxSxI, k_seg_BxS))

  @nn.compact
  def decode(self, x_BxCxD, positions_BxC, segment_ids_BxC, max_len: int):
    """x_BxCxD -> y_BxCxD with the latent cache ``latent`` [B, S, R + Dr] and ``index_keys`` [B, S, I].

    Same stages as training: ``warmup`` attends densely, else over the
    indexer's top-``index_topk`` cached keys (no KL is computed).
    """
    a = self.cfg.attention
    step, p, keys_BxSxDk = self.decode_step(x_BxCxD, positions_BxC, segment_ids_BxC, max_len)
    q_i, w_i, k_i = self.indexer(x_BxCxD, p.q_resid_BxTxRq, positions_BxC)
    k_i_BxSxI = cache.extend(self, "index_keys", step, k_i, max_len)
    if a.indexer_stage == "warmup":
      return self.output(self.absorbed_dense(p, keys_BxSxDk, cache.visible(step, max_len)))
    k_idx, k_seg = cache.keys(step, max_len)
    top = min(a.index_topk, keys_BxSxDk.shape[1])
    out_BxCxHxDv, _ = self.sparse_core(p, q_i, w_i, keys_BxSxDk, k_i_BxSxI, step.q_pos_BxC, step.q_seg_BxC,
                                       k_idx, k_seg, top, with_kl=False)
    return self.output(out_BxCxHxDv)

  def _dense_logits(self, keys_BxTxDk, q_nope, q_rope):
    """Absorbed logits of some queries against the latent keys, float32 [B, Q, H, T]."""
    return jnp.einsum("BQHk,BSk->BQHS", self.absorb_query(q_nope, q_rope), keys_BxTxDk,
                      preferred_element_type=jnp.float32) * self.scale

  def _warmup_kl(self, p: MLAProjection, q_i, w_i, k_i, segment_ids_BxT):
    """KL(dense main attention || indexer) over all visible keys, a query chunk at a time."""
    t, h = segment_ids_BxT.shape[1], self.cfg.num_heads

    def chunk(start, xs, seg_BxQ, shared):
      q_nope, q_rope, q_i_c, w_i_c = xs
      keys_BxTxDk, k_i, segment_ids_BxT = shared  # all-gathered over context (context_parallel.py)
      valid_BxQxS = core.visible(start + jnp.arange(seg_BxQ.shape[1]), jnp.arange(t), seg_BxQ, segment_ids_BxT)
      logits = self._dense_logits(keys_BxTxDk, q_nope, q_rope)
      lse = core.masked_lse(logits, valid_BxQxS, self.sinks_H)
      return (), indexer.kl_to_main(logits, lse, indexer.scores(q_i_c, w_i_c, k_i), valid_BxQxS, seg_BxQ > 0)

    per_query = (p.q_nope_BxTxHxDn, p.q_rope_BxTxHxDr, q_i, w_i)
    _, sums = context_parallel.map_query_chunks(chunk, core.chunk_rows(self.cfg.attention.chunk_size, t * h),
                                                per_query, segment_ids_BxT, (self.latent_keys(p), k_i, segment_ids_BxT))
    return sums

  def _recall(self, p: MLAProjection, q_i, w_i, k_i, segment_ids_BxT, top: int):
    t = segment_ids_BxT.shape[1]
    rows = indexer.recall_rows(t, self.cfg.attention.indexer_recall_queries)
    seg_BxR = segment_ids_BxT[:, rows]
    valid = core.visible(jnp.asarray(rows), jnp.arange(t), seg_BxR, segment_ids_BxT)
    logits = self._dense_logits(self.latent_keys(p), p.q_nope_BxTxHxDn[:, rows], p.q_rope_BxTxHxDr[:, rows])
    return indexer.recall(logits, valid, indexer.scores(q_i[:, rows], w_i[:, rows], k_i), top, seg_BxR > 0)
