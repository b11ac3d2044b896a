"""DeepSeek-V4 hybrid attention: shared-KV MQA over a window plus compressed entries.

Every V4 layer (DeepSeek-V4 report §2.3; HF ``DeepseekV4Attention``):

* low-rank queries ``q = unweighted_rmsnorm(rmsnorm(x W_qa) W_qb)`` per head
  and one shared key=value head ``kv = rmsnorm(x W_kv)`` (MQA, K = V), both
  with rope on the *trailing* ``attention.rope_dim`` channels (V4:
  interleaved, ``rope_layout="interleave"``);
* a causal sliding window of ``attention.window`` tokens, and per-head
  attention sinks, all in one softmax with the compressed entries below;
* the output's rope channels de-rotated (rope at ``-position``), then a
  grouped low-rank output projection: heads split into ``o_groups`` groups,
  each projected to ``o_lora_rank`` (``w_o_a``), then mixed to D (``w_o_b``).

Types: ``swa`` (window only; "main" rope: ``model.rope_theta``,
``attention.yarn``), and with compressed entries and the "compress" rope
(``attention.compress_rope_theta``, ``attention.compress_yarn``):

* ``hca`` — entry w pools tokens ``[w m, (w+1) m)`` (m = ``hca_ratio``) by a
  learned softmax gate, ``sum_j softmax_j(x_j W_gate + bias_j) * (x_j W_kv)``,
  then rmsnorm and rope at the window's first position; every query attends
  to all complete entries;
* ``csa`` — m = ``csa_ratio`` with two series per token (Ca, Cb): entry w
  pools Ca of window w-1 and Cb of window w (overlapping width 2m); a
  lightning indexer with its own compressor keeps the ``index_topk`` best
  entries per query (trained as in ``indexer.py``).

Causality is exact: query t sees entry w iff ``(w+1) m <= t + 1`` (every
pooled token is at or before t) and all its tokens are in t's document.

Parameter names -> HF ``layers.N.self_attn.*``: ``w_q_a``/``q_a_norm``/
``w_q_b`` = q_a_proj/q_a_norm/q_b_proj, ``w_kv``/``kv_norm`` = kv_proj/kv_norm,
``w_o_a [G, H Dh / G, Ro]`` = o_a_proj (weight viewed [G, Ro, H Dh / G],
transposed), ``w_o_b [G, Ro, D]`` = o_b_proj.T, ``sinks`` = sinks;
``compressor/{w_kv, w_gate, position_bias, kv_norm}`` = compressor.{kv_proj,
gate_proj, position_bias, kv_norm}; ``indexer/{w_kv, w_gate, position_bias,
kv_norm, w_q_b, w_weights}`` = compressor.indexer.{kv_proj, gate_proj,
position_bias, kv_norm, q_b_proj, scorer.weights_proj}.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.layers.attention import cache, context_parallel, core, indexer, options
from moejax.layers.attention.registry import ATTENTION
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import Rope, apply_rope


class Entries(NamedTuple):
  """Compressed entries of a row: values and what decides who may see them."""

  kv_BxZxDh: jax.Array  # rotated, normalised
  last_Z: jax.Array     # index of the last pooled token: query t sees entry w iff last[w] <= t
  segment_BxZ: jax.Array  # the document all pooled tokens belong to, -1 if they straddle two (or empty)

  def visible(self, q_idx_BxQ, q_seg_BxQ):
    """Bool [B, Q, N] (query indices [Q] or [B, Q])."""
    q_idx = jnp.broadcast_to(q_idx_BxQ, q_seg_BxQ.shape)
    return ((self.last_Z[None, None, :] <= q_idx[:, :, None])
            & (self.segment_BxZ[:, None, :] == q_seg_BxQ[:, :, None]) & (q_seg_BxQ > 0)[:, :, None])


def compress_rows(module: nn.Module, x_BxTxD, offset_BxT, ratio: int, dim: int, overlap: bool):
  """Per-token rows of the pooling: (kv_BxTxC, gate_BxTxC float32 incl. the position bias), C = c * dim.

  ``offset`` is each token's place in its window (``t % ratio``). Creates,
  on ``module``: ``w_kv``/``w_gate [D, C]``, ``position_bias [ratio, C]``
  (float32, zeros), with c = 2 (Ca, Cb) if ``overlap`` else 1.
  """
  c = (2 if overlap else 1) * dim
  w_kv = options.weight(module, "w_kv", (module.cfg.d_model, c), ("embed", "head_dim"))
  w_gate = options.weight(module, "w_gate", (module.cfg.d_model, c), ("embed", "head_dim"))
  bias = module.param("position_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "head_dim")),
                      (ratio, c), jnp.float32)
  x = x_BxTxD.astype(w_kv.dtype)
  gate = jnp.einsum("BTD,DC->BTC", x, w_gate).astype(jnp.float32) + bias[offset_BxT]
  return jnp.einsum("BTD,DC->BTC", x, w_kv), gate


def pool(module: nn.Module, kv_BxZxMxC, gate_BxZxMxC, start_positions_BxZ, rope: Rope):
  """Entries ``rope(rmsnorm(sum_j softmax_j(gate) * kv))`` [B, Z, Dh]; creates ``kv_norm`` on ``module``."""
  weights = jax.nn.softmax(gate_BxZxMxC, axis=2).astype(kv_BxZxMxC.dtype)
  dtype, pdtype = options.dtypes(module.cfg)
  pooled_BxZxDh = RMSNorm(module.cfg.norm_eps, dtype, pdtype, name="kv_norm")(jnp.sum(weights * kv_BxZxMxC, axis=2))
  return apply_rope(pooled_BxZxDh, start_positions_BxZ, rope)


def compress(module: nn.Module, x_BxTxD, positions_BxT, segment_ids_BxT, ratio: int, dim: int, overlap: bool,
             rope: Rope) -> Entries:
  """Softmax-gated pooling of each complete window of ``ratio`` tokens (see module doc).

  Parameters: :func:`compress_rows`' and ``kv_norm``. A trailing incomplete
  window yields no entry.
  """
  b, t = segment_ids_BxT.shape
  n = t // ratio
  offset_BxT = jnp.broadcast_to(jnp.arange(n * ratio) % ratio, (b, n * ratio))
  kv_BxTxC, gate_BxTxC = compress_rows(module, x_BxTxD[:, :n * ratio], offset_BxT, ratio, dim, overlap)
  kv_BxZxMxC = kv_BxTxC.reshape(b, n, ratio, kv_BxTxC.shape[-1])
  gate_BxZxMxC = gate_BxTxC.reshape(b, n, ratio, gate_BxTxC.shape[-1])
  if overlap:  # entry w pools Ca (channels :dim) of window w-1 and Cb (dim:) of window w
    shift = lambda a, fill: jnp.pad(a[..., :dim], [(0, 0), (1, 0), (0, 0), (0, 0)], constant_values=fill)[:, :n]
    kv_BxZxMxC = jnp.concatenate([shift(kv_BxZxMxC, 0), kv_BxZxMxC[..., dim:]], axis=2)
    gate_BxZxMxC = jnp.concatenate([shift(gate_BxZxMxC, core.NEG), gate_BxZxMxC[..., dim:]], axis=2)
  starts = np.arange(n) * ratio  # static
  kv_BxZxDh = pool(module, kv_BxZxMxC, gate_BxZxMxC, positions_BxT[:, starts], rope)
  first = np.maximum(starts - ratio, 0) if overlap else starts
  last = starts + ratio - 1
  seg_first, seg_last = segment_ids_BxT[:, first], segment_ids_BxT[:, last]
  return Entries(kv_BxZxDh, last, jnp.where(seg_first == seg_last, seg_last, -1))


def compress_decode(module: nn.Module, x_BxCxD, positions_BxC, step: cache.Step, max_len: int, ratio: int,
                    dim: int, overlap: bool, rope: Rope) -> Entries:
  """:func:`compress` for a decode chunk: the entries of the whole cache after this chunk.

  Cache variables on ``module``: ``entries [B, max_len // ratio, dim]`` (entry
  w in slot w) and the partial-window state ``kv_rows``/``gate_rows [B, c m,
  c dim]``, the rows of the row's last c m tokens (c = 2 for csa: the
  incomplete window and the previous window, whose Ca half the next entry
  pools). Entries completed by the chunk (at most ceil(C / m) per row) are
  pooled from ``[state | chunk]`` rows and written; entry w is visible to
  queries at positions >= ``(w + 1) m - 1``.
  """
  b, c = x_BxCxD.shape[:2]
  hist = (2 if overlap else 1) * ratio
  kv_BxCxC, gate_BxCxC = compress_rows(module, x_BxCxD, step.q_pos_BxC % ratio, ratio, dim, overlap)
  kv_state = module.variable("cache", "kv_rows", jnp.zeros, (b, hist, kv_BxCxC.shape[-1]), kv_BxCxC.dtype)
  gate_state = module.variable("cache", "gate_rows", jnp.zeros, (b, hist, kv_BxCxC.shape[-1]), jnp.float32)
  base_B = step.index_B - hist  # position of row 0 of [state | chunk]
  kv_rows = jnp.concatenate([kv_state.value, kv_BxCxC], axis=1)
  gate_rows = jnp.concatenate([gate_state.value, gate_BxCxC], axis=1)
  before_start = (base_B[:, None] + jnp.arange(hist + c)) < 0  # rows before the sequence (the Ca of window -1)
  gate_rows = jnp.where(before_start[:, :, None], core.NEG, gate_rows)

  window_BxJ = step.index_B[:, None] // ratio + jnp.arange(-(-c // ratio))  # windows that may complete
  done_BxJ = (window_BxJ + 1) * ratio <= (step.index_B + step.count_B)[:, None]
  rows_BxJxM = (window_BxJ * ratio - base_B[:, None])[:, :, None] + jnp.arange(ratio)
  take = lambda rows, at: indexer.gather(rows, jnp.clip(at, 0, hist + c - 1))  # rows[b, at[b, ...]]
  kv_BxJxMxC, gate_BxJxMxC = take(kv_rows, rows_BxJxM), take(gate_rows, rows_BxJxM)
  if overlap:  # Ca (:dim) of the previous window, Cb (dim:) of this one
    prev = lambda rows: take(rows, rows_BxJxM - ratio)[..., :dim]
    kv_BxJxMxC = jnp.concatenate([prev(kv_rows), kv_BxJxMxC[..., dim:]], axis=2)
    gate_BxJxMxC = jnp.concatenate([prev(gate_rows), gate_BxJxMxC[..., dim:]], axis=2)
  new_BxJxDh = pool(module, kv_BxJxMxC, gate_BxJxMxC, window_BxJ * ratio, rope)

  n = max_len // ratio
  entries = module.variable("cache", "entries", jnp.zeros, (b, n, dim), new_BxJxDh.dtype)
  slot_BxJ = jnp.where(done_BxJ, window_BxJ, n)  # not complete: dropped
  entries.value = entries.value.at[jnp.arange(b)[:, None], slot_BxJ].set(new_BxJxDh, mode="drop")
  keep_BxH = step.count_B[:, None] + jnp.arange(hist)  # the last ``hist`` positions after the chunk
  kv_state.value = take(kv_rows, keep_BxH)
  gate_state.value = take(gate_rows, keep_BxH)
  last_Z = np.arange(n) * ratio + ratio - 1
  filled_BxZ = last_Z[None, :] < (step.index_B + step.count_B)[:, None]
  return Entries(entries.value, last_Z, jnp.where(filled_BxZ, 1, -1))


class Compressor(nn.Module):
  """(x_BxTxD, positions_BxT, segment_ids_BxT) -> Entries of width Dh (V4 compressor)."""

  cfg: ml_collections.FrozenConfigDict
  ratio: int
  overlap: bool
  rope: Rope

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, decode: tuple[cache.Step, int] | None = None):
    """``decode = (step, max_len)``: a decode chunk (:func:`compress_decode`)."""
    if decode:
      return compress_decode(self, x_BxTxD, positions_BxT, *decode, self.ratio, options.head_dim(self.cfg),
                             self.overlap, self.rope)
    return compress(self, x_BxTxD, positions_BxT, segment_ids_BxT, self.ratio, options.head_dim(self.cfg),
                    self.overlap, self.rope)


class CompressedIndexer(nn.Module):
  """V4's lightning indexer: -> (q_BxTxJxI, w_BxTxJ, Entries of width I) with its own compressor."""

  cfg: ml_collections.FrozenConfigDict
  rope: Rope

  @nn.compact
  def __call__(self, x_BxTxD, q_resid_BxTxRq, positions_BxT, segment_ids_BxT,
               decode: tuple[cache.Step, int] | None = None):
    a = self.cfg.attention
    if decode:
      entries = compress_decode(self, x_BxTxD, positions_BxT, *decode, a.csa_ratio, a.index_head_dim, True,
                                self.rope)
    else:
      entries = compress(self, x_BxTxD, positions_BxT, segment_ids_BxT, a.csa_ratio, a.index_head_dim, True,
                         self.rope)
    q_BxTxJxI, w_BxTxJ = indexer.indexer_queries(self, x_BxTxD, q_resid_BxTxRq, positions_BxT, self.rope)
    return q_BxTxJxI, w_BxTxJ, entries


class V4Attention(nn.Module):
  """x_BxTxD -> y_BxTxD: DeepSeek-V4 attention (see module doc); ``compression`` none | csa | hca."""

  windowed: ClassVar[bool] = True
  rope_dim: ClassVar[bool] = True
  needs_q_lora: ClassVar[bool] = True
  grouped_output: ClassVar[bool] = True

  cfg: ml_collections.FrozenConfigDict
  compression: str = "none"

  def setup(self):
    cfg, a = self.cfg, self.cfg.attention
    d, h, dh, g = cfg.d_model, cfg.num_heads, options.head_dim(cfg), a.o_groups
    dtype, pdtype = options.dtypes(cfg)
    self.w_q_a = options.weight(self, "w_q_a", (d, a.q_lora_rank), ("embed", "lora"))
    self.q_a_norm = RMSNorm(cfg.norm_eps, dtype, pdtype)
    self.w_q_b = options.weight(self, "w_q_b", (a.q_lora_rank, h, dh), ("lora", "heads", "head_dim"))
    self.w_kv = options.weight(self, "w_kv", (d, dh), ("embed", "head_dim"))
    self.kv_norm = RMSNorm(cfg.norm_eps, dtype, pdtype)
    self.w_o_a = options.weight(self, "w_o_a", (g, h * dh // g, a.o_lora_rank), ("o_groups", None, "lora"))
    self.w_o_b = options.weight(self, "w_o_b", (g, a.o_lora_rank, d), ("o_groups", "lora", "embed"))
    self.sinks_H = options.sinks(self, h)
    if self.compression == "none":
      self.rope = options.main_rope(cfg, dim=a.rope_dim, part="trailing")
    else:
      self.rope = options.compress_rope(cfg, dim=a.rope_dim)
      ratio = a.csa_ratio if self.compression == "csa" else a.hca_ratio
      self.compressor = Compressor(cfg, ratio, self.compression == "csa", self.rope)
    if self.compression == "csa":
      self.indexer = CompressedIndexer(cfg, self.rope)
    self.scale = dh ** -0.5 * self.rope.softmax_scale

  def project(self, x_BxTxD, positions_BxT):
    """(q_resid_BxTxRq, q_BxTxHxDh, kv_BxTxDh): queries and the shared key=value, rotated."""
    x = x_BxTxD.astype(self.w_q_a.dtype)
    q_resid = self.q_a_norm(jnp.einsum("BTD,DR->BTR", x, self.w_q_a))
    q = jnp.einsum("BTR,RHd->BTHd", q_resid, self.w_q_b)
    q32 = q.astype(jnp.float32)
    q = (q32 * jax.lax.rsqrt(jnp.mean(q32 * q32, -1, keepdims=True) + self.cfg.norm_eps)).astype(q.dtype)
    q = nn.with_logical_constraint(apply_rope(q, positions_BxT, self.rope),
                                   ("act_batch", "act_length", "act_heads", None))
    kv = apply_rope(self.kv_norm(jnp.einsum("BTD,Dd->BTd", x, self.w_kv)), positions_BxT, self.rope)
    return q_resid, q, kv

  def output(self, out_BxTxHxDh, positions_BxT):
    """De-rotate the rope channels, then the grouped low-rank projection -> [B, T, D]."""
    b, t = positions_BxT.shape
    out = apply_rope(out_BxTxHxDh, positions_BxT, self.rope, inverse=True)
    out = out.reshape(b, t, self.cfg.attention.o_groups, -1)
    return jnp.einsum("BTGR,GRD->BTD", jnp.einsum("BTGI,GIR->BTGR", out, self.w_o_a), self.w_o_b)

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    a = self.cfg.attention
    q_resid, q_BxTxHxDh, kv_BxTxDh = self.project(x_BxTxD, positions_BxT)
    kv_BxTx1xDh = kv_BxTxDh[:, :, None, :]
    kw = dict(scale=self.scale, window=a.window, block=options.flash_block(self.cfg))
    entries = picks = None
    if self.compression != "none":
      entries = self.compressor(x_BxTxD, positions_BxT, segment_ids_BxT)
    if self.compression == "csa":  # the indexer learns from its KL only: detached inputs
      sg = jax.lax.stop_gradient
      picks = self.indexer(sg(x_BxTxD), sg(q_resid), positions_BxT, segment_ids_BxT)
    if entries is None or entries.kv_BxZxDh.shape[1] == 0:
      out, max_logit = context_parallel.causal_attention(
          q_BxTxHxDh, kv_BxTx1xDh, kv_BxTx1xDh, segment_ids_BxT, sinks_H=self.sinks_H,
          kernel=options.attention_kernel(self.cfg, x_BxTxD.shape[1]), track_max_logit=a.track_max_logit, **kw)
    else:
      window = context_parallel.flash_attention(q_BxTxHxDh, kv_BxTx1xDh, kv_BxTx1xDh, segment_ids_BxT, **kw)
      q_idx_BxT = jnp.broadcast_to(jnp.arange(x_BxTxD.shape[1]), segment_ids_BxT.shape)
      compressed, sums, recall = self.compressed_part(q_BxTxHxDh, q_idx_BxT, segment_ids_BxT, entries, picks,
                                                      window[1])
      out, _ = core.merge([window[:2], compressed], self.sinks_H)
      max_logit = jnp.maximum(window[2], sums.pop("max_logit"))
      indexer.sow_training(self, sums, recall)
    core.sow_max_logit(self, max_logit, a.track_max_logit)
    return self.output(out, positions_BxT)

  def compressed_part(self, q_BxTxHxDh, q_idx_BxT, segment_ids_BxT, entries: Entries, picks, window_lse_BxTxH,
                      training: bool = True):
    """Attention over the compressed entries: ((out, lse), sums, recall or None), a query chunk at a time.

    ``picks`` = the indexer's (q_BxTxJxI, w_BxTxJ, Entries) for csa, None for
    hca (all entries); ``q_idx`` the queries' token indices (``Entries.visible``).
    ``training=False`` (decoding) skips the indexer's KL and recall.
    """
    a = self.cfg.attention
    n = entries.kv_BxZxDh.shape[1]
    sg = jax.lax.stop_gradient
    q_i, w_i, idx_entries = picks or (None, None, None)
    stage = a.indexer_stage if picks else "dense"
    dense = stage in ("dense", "warmup")
    top = min(a.index_topk, n)

    def chunk(_, xs, seg_BxQ, shared):
      q, lse_w, q_i_c, w_i_c, q_idx_BxQ = xs
      kv_BxZxDh, entry_seg_BxZ, idx_kv_BxZxI = shared  # all-gathered over context (context_parallel.py)
      valid_BxQxZ = Entries(kv_BxZxDh, entries.last_Z, entry_seg_BxZ).visible(q_idx_BxQ, seg_BxQ)
      if dense:
        keys, ok, spec = kv_BxZxDh, valid_BxQxZ, "BS"
      else:
        idx, ok = indexer.top_k(indexer.scores(sg(q_i_c), sg(w_i_c), sg(idx_kv_BxZxI)), valid_BxQxZ, top)
        keys, spec = indexer.gather(kv_BxZxDh, idx), "BQS"
      logits = jnp.einsum(f"BQHd,{spec}d->BQHS", q, keys, preferred_element_type=jnp.float32) * self.scale
      out, lse, max_logit = core.masked_attention(logits, keys, ok, spec)
      sums = {"max_logit": max_logit}
      if training and stage in ("warmup", "sparse"):
        if dense:
          index = indexer.scores(q_i_c, w_i_c, idx_kv_BxZxI)
        else:
          index = indexer.gathered_scores(q_i_c, w_i_c, indexer.gather(idx_kv_BxZxI, idx))
        lse_all = jax.nn.logsumexp(jnp.stack([lse, lse_w, jnp.broadcast_to(self.sinks_H, lse.shape)]), axis=0)
        sums.update(indexer.kl_to_main(logits, lse_all, index, ok, seg_BxQ > 0))
      return (out.astype(q.dtype), lse), sums

    rows = core.chunk_rows(a.chunk_size, n * (self.cfg.num_heads if dense else 1))  # [rows, H or 1, N] scores
    shared = (entries.kv_BxZxDh, entries.segment_BxZ, idx_entries.kv_BxZxDh if picks else None)
    compressed, sums = context_parallel.map_query_chunks(
        chunk, rows, (q_BxTxHxDh, window_lse_BxTxH, q_i, w_i, q_idx_BxT), segment_ids_BxT, shared)
    recall = None
    if training and self.compression == "csa" and indexer.wants_recall(self):
      rows = indexer.recall_rows(segment_ids_BxT.shape[1], a.indexer_recall_queries)
      seg_BxR = segment_ids_BxT[:, rows]
      logits = jnp.einsum("BRHd,BZd->BRHZ", q_BxTxHxDh[:, rows], entries.kv_BxZxDh,
                          preferred_element_type=jnp.float32) * self.scale
      index = indexer.scores(q_i[:, rows], w_i[:, rows], idx_entries.kv_BxZxDh)
      recall = indexer.recall(logits, entries.visible(jnp.asarray(rows), seg_BxR), index, top, seg_BxR > 0)
    return compressed, sums, recall


  @nn.compact
  def decode(self, x_BxCxD, positions_BxC, segment_ids_BxC, max_len: int):
    """x_BxCxD -> y_BxCxD with a ring ``kv [B, window, Dh]`` of the shared key=value and, for
    csa/hca, the compressor's (and csa's indexer's) entry caches (:func:`compress_decode`)."""
    a = self.cfg.attention
    step = cache.begin(self, segment_ids_BxC)
    q_resid, q_BxCxHxDh, kv_BxCxDh = self.project(x_BxCxD, positions_BxC)
    size = min(a.window, max_len)
    kv_BxSx1xDh = cache.extend(self, "kv", step, kv_BxCxDh, size)[:, :, None]
    window = cache.attend(q_BxCxHxDh, kv_BxSx1xDh, kv_BxSx1xDh, cache.visible(step, size, a.window),
                          scale=self.scale, block=a.chunk_size)
    parts = [window]
    if self.compression != "none" and max_len >= self.compressor.ratio:  # else no entry ever completes
      entries = self.compressor(x_BxCxD, positions_BxC, segment_ids_BxC, decode=(step, max_len))
      picks = None
      if self.compression == "csa":
        picks = self.indexer(x_BxCxD, q_resid, positions_BxC, segment_ids_BxC, decode=(step, max_len))
      compressed, _, _ = self.compressed_part(q_BxCxHxDh, step.q_pos_BxC, step.q_seg_BxC, entries, picks,
                                              window[1], training=False)
      parts.append(compressed)
    out, _ = core.merge(parts, self.sinks_H)
    return self.output(out, positions_BxC)


@ATTENTION.register("swa")
class SlidingV4Attention(V4Attention):
  """DeepSeek-V4 attention with the window only (V4's ``sliding_attention`` layers)."""

  compression: str = "none"


@ATTENTION.register("csa")
class CompressedSparseAttention(V4Attention):
  """DeepSeek-V4 CSA: window + indexer-selected overlapping compressed entries (m = csa_ratio)."""

  indexed: ClassVar[bool] = True

  compression: str = "csa"

  @staticmethod
  def validate_config(cfg) -> list[str]:
    a = cfg.model.attention
    return _check_ratio(a, "csa_ratio") + indexer.check_rope(a, "csa", a.rope_dim or a.index_head_dim)


@ATTENTION.register("hca")
class HeavilyCompressedAttention(V4Attention):
  """DeepSeek-V4 HCA: window + all heavily compressed entries (m = hca_ratio)."""

  compression: str = "hca"

  @staticmethod
  def validate_config(cfg) -> list[str]:
    return _check_ratio(cfg.model.attention, "hca_ratio")


V4_TYPES = ("swa", "csa", "hca")  # the DeepSeek-V4 types above


def _check_ratio(a, field: str) -> list[str]:
  return [] if a[field] >= 1 else [f"model.attention.{field}={a[field]} must be >= 1 (tokens per compressed entry)."]
