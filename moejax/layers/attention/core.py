"""The attention math every type shares: masks, a flash-style kernel, merging.

Visibility (``visible``): query index t sees key index s iff ``s <= t``, both
are in the same packed document (``segment_ids``, 0 = padding; a padding
query sees only itself, so its softmax stays finite) and, with a window w,
``s > t - w`` (HF's sliding-window rule: the query and its w-1 predecessors).

Kernels, all returning per-query log-sum-exp so partial results over
disjoint key sets combine exactly (:func:`merge`, which also adds the
per-head *attention sink* logit to the denominator, Xiao et al., 2023 /
gpt-oss / DeepSeek-V4):

* :func:`flash_attention` — online-softmax attention over key blocks (Dao et
  al., 2022) with a hand-written backward (``jax.custom_vjp``): fwd + bwd
  memory is O(T·block), never [T, T]; key blocks outside the causal band (or
  the sliding window) are skipped, so sliding attention costs O(T·(w+block)).
* :func:`xla_attention` — one fused call with an explicit [T, T] mask, for
  short T: ``jax.nn.dot_product_attention`` through XLA or cuDNN, or
  ``tokamax.dot_product_attention`` (:data:`FUSED`).
* :func:`masked_attention` — softmax over an explicit, per-query key set
  (compressed entries, top-k selections), one query chunk at a time
  (:func:`map_query_chunks`: ``lax.scan`` with per-chunk rematerialisation).

Softmax statistics are float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax.layers import library_kernels

NEG = -1e30  # finite "-inf" for masked logits: exp underflows to 0, max/where stay NaN-free
SCORE_BUDGET = 1 << 24  # float32 score elements one query chunk may hold (64 MiB)


def visible(q_idx_Q, k_idx_S, q_seg_BxQ, k_seg_BxS, window: int = 0):
  """Bool [B, Q, S]: causal, same document, padding sees itself, within the window.

  Indices are shared by the batch (``[Q]``, ``[S]``) or per row (``[B, Q]``,
  ``[B, S]``: a decode cache, where each row has its own fill level).
  """
  q_idx, k_idx = q_idx_Q[..., :, None], k_idx_S[..., None, :]
  causal = k_idx <= q_idx
  if window:
    causal &= k_idx > q_idx - window
  same_BxQxS = q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :]
  real_BxQxS = (q_seg_BxQ > 0)[:, :, None] | (k_idx == q_idx)
  return causal & same_BxQxS & real_BxQxS


def chunk_rows(chunk: int, columns: int) -> int:
  """Query rows per chunk: ``chunk``, fewer if rows x columns scores exceed ``SCORE_BUDGET`` (>= 8)."""
  return int(min(chunk, max(8, SCORE_BUDGET // max(columns, 1))))


def _pad_axis1(x, size: int, value=0):
  pad = size - x.shape[1]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


# ----------------------------------------------------------------------------- flash


def flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, *, scale: float, window: int = 0,
                    block: int = 512):
  """Causal self-attention, one key block at a time; never holds [T, T].

  Returns ``(out_BxTxHxDv, lse_BxTxH, max_logit_H)``: the output normalised
  over the visible keys only, the float32 log-sum-exp of the scaled logits
  ``q·k·scale`` (``NEG`` for a query with no visible key), and the max
  visible logit per head (no gradient). Groups of H/K query heads share a
  kv head (GQA/MQA). Differentiable in q, k, v (both outputs).
  """
  b, t, h, d = q_BxTxHxDh.shape
  kv = k_BxTxKxDh.shape[2]
  block = int(min(block, t))
  tp = -(-t // block) * block
  q = _pad_axis1(q_BxTxHxDh, tp).reshape(b, tp, kv, h // kv, d)
  k, v = _pad_axis1(k_BxTxKxDh, tp), _pad_axis1(v_BxTxKxDv, tp)
  seg = _pad_axis1(segment_ids_BxT, tp, value=-1)  # padded rows see only themselves
  out, lse, max_logit = _flash(q, k, v, seg, scale, window, block)
  out = out.reshape(b, tp, h, -1)[:, :t]
  return out, lse.reshape(b, tp, h)[:, :t], max_logit.reshape(h)


def _key_block_range(i, block: int, window: int, num_blocks: int):
  """Key blocks [lo, hi) that query block i can see (causal band, window)."""
  hi = jnp.minimum(num_blocks, i + 1)
  lo = jnp.maximum(0, (i * block - window + 1) // block) if window else 0
  return lo, hi


def _block_scores(q_i, k, seg, q_seg_i, i, j, scale, window, block):
  """Scaled logits [B, K, G, Q, S] of query block i vs key block j, masked with NEG."""
  k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
  k_seg_j = jax.lax.dynamic_slice_in_dim(seg, j * block, block, axis=1)
  s = jnp.einsum("BQKGd,BSKd->BKGQS", q_i, k_j, preferred_element_type=jnp.float32) * scale
  idx = jnp.arange(block)
  vis = visible(i * block + idx, j * block + idx, q_seg_i, k_seg_j, window)[:, None, None]
  return jnp.where(vis, s, NEG), vis


def _blocks(x, block):
  """[B, T, ...] -> [T/block, B, block, ...]."""
  return jnp.swapaxes(x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]), 0, 1)


def _unblocks(x):
  """[n, B, block, ...] -> [B, n*block, ...]."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, seg, scale, window, block):
  return _flash_fwd(q, k, v, seg, scale, window, block)[0]


def _flash_fwd(q, k, v, seg, scale, window, block):
  b, tp, kv, g, _ = q.shape
  e = v.shape[-1]
  n = tp // block

  def query_block(_, xs):
    i, q_i, q_seg_i = xs

    def key_block(j, carry):
      m, l, acc = carry
      s, vis = _block_scores(q_i, k, seg, q_seg_i, i, j, scale, window, block)
      v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
      m_new = jnp.maximum(m, s.max(-1))
      # No second mask: a masked logit is NEG, so exp(s - m_new) is 0 once the row has seen a key; a
      # row with none yet (m_new = NEG) adds garbage that corr = exp(NEG - m) = 0 wipes when its first
      # key arrives, and that is certain: the diagonal block, holding the query itself, comes last.
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      acc = acc * corr[..., None] + jnp.einsum("BKGQS,BSKv->BKGQv", p.astype(v.dtype), v_j,
                                               preferred_element_type=jnp.float32)
      return m_new, l * corr + p.sum(-1), acc

    lo, hi = _key_block_range(i, block, window, n)
    init = (jnp.full((b, kv, g, block), NEG, jnp.float32), jnp.zeros((b, kv, g, block), jnp.float32),
            jnp.zeros((b, kv, g, block, e), jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo, hi, key_block, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
    m = jnp.where((q_seg_i >= 0)[:, None, None, :], m, NEG)  # rows padded by the kernel do not count
    return None, (jnp.moveaxis(out, 3, 1), jnp.moveaxis(lse, 3, 1), m.max(axis=(0, 3)))

  _, (out, lse, m) = jax.lax.scan(query_block, None, (jnp.arange(n), _blocks(q, block), _blocks(seg, block)))
  out = _unblocks(out).astype(v.dtype)  # [B, Tp, K, G, Dv]
  lse = _unblocks(lse)                  # [B, Tp, K, G]
  return (out, lse, m.max(0)), (q, k, v, seg, out, lse)


def _flash_bwd(scale, window, block, residuals, cotangents):
  q, k, v, seg, out, lse = residuals
  d_out, d_lse, _ = cotangents
  n = q.shape[1] // block
  delta = jnp.einsum("BTKGv,BTKGv->BTKG", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def query_block(carry, xs):
    i, q_i, q_seg_i, do_i, lse_i, delta_i, dlse_i = xs
    to_bkgq = lambda x: jnp.moveaxis(x, 1, 3)  # [B, Q, K, G] -> [B, K, G, Q]
    lse_i, delta_i, dlse_i = to_bkgq(lse_i), to_bkgq(delta_i), to_bkgq(dlse_i)

    def key_block(j, c):
      dq_i, dk, dv = c
      s, vis = _block_scores(q_i, k, seg, q_seg_i, i, j, scale, window, block)
      k_j = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
      v_j = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
      p = jnp.where(vis, jnp.exp(s - lse_i[..., None]), 0.0)
      dp = jnp.einsum("BQKGv,BSKv->BKGQS", do_i, v_j, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_i[..., None] + dlse_i[..., None]) * scale
      dq_i = dq_i + jnp.einsum("BKGQS,BSKd->BQKGd", ds, k_j.astype(jnp.float32))
      dk_j = jnp.einsum("BKGQS,BQKGd->BSKd", ds, q_i.astype(jnp.float32))
      dv_j = jnp.einsum("BKGQS,BQKGv->BSKv", p, do_i.astype(jnp.float32))
      add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
          acc, jax.lax.dynamic_slice_in_dim(acc, j * block, block, axis=1) + x, j * block, axis=1)
      return dq_i, add(dk, dk_j), add(dv, dv_j)

    lo, hi = _key_block_range(i, block, window, n)
    dq_i, dk, dv = jax.lax.fori_loop(lo, hi, key_block, (jnp.zeros(q_i.shape, jnp.float32), *carry))
    return (dk, dv), dq_i

  xs = (jnp.arange(n), _blocks(q, block), _blocks(seg, block), _blocks(d_out, block), _blocks(lse, block),
        _blocks(delta, block), _blocks(d_lse.astype(jnp.float32), block))
  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  (dk, dv), dq = jax.lax.scan(query_block, init, xs)
  return _unblocks(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- xla / explicit


def _tokamax_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, *, bias, mask, scale):
  return library_kernels.tokamax().dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, bias=bias, mask=mask,
                                                         scale=scale, is_causal=True)


# The fused kernels of ``xla_attention``: ``(q, k, v, *, bias, mask, scale) -> out``. The mask is
# causal already; ``is_causal`` lets cuDNN and tokamax skip the blocks above the diagonal.
FUSED = {
    "xla": jax.nn.dot_product_attention,
    "cudnn": functools.partial(jax.nn.dot_product_attention, implementation="cudnn", is_causal=True),
    "tokamax": _tokamax_attention,
}


def xla_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, *, scale: float, window: int = 0,
                  sinks_H=None, track_max_logit: bool = False, kernel: str = "xla"):
  """One fused attention call (``FUSED[kernel]``) with an explicit [B, 1, T, T] mask (short T).

  Sinks enter as one extra key with zero k and v whose logit is the sink (a
  [1, H, 1, T+1] bias; ``xla`` only). Returns ``(out_BxTxHxDv, max_logit_H or
  None)``; the max logit, when asked for, is computed from explicit
  [B, H, T, T] scores.
  """
  b, t, h, d = q_BxTxHxDh.shape
  e = v_BxTxKxDv.shape[-1]
  idx = jnp.arange(t)
  mask = visible(idx, idx, segment_ids_BxT, segment_ids_BxT, window)[:, None]
  k, v = k_BxTxKxDh, v_BxTxKxDv
  if e < d:  # the kernel needs one head dim for k and v (MLA has Dv < Dqk)
    v = jnp.pad(v, [(0, 0)] * 3 + [(0, d - e)])
  bias = None
  if sinks_H is not None:
    k = jnp.pad(k, [(0, 0), (0, 1), (0, 0), (0, 0)])
    v = jnp.pad(v, [(0, 0), (0, 1), (0, 0), (0, 0)])
    mask = jnp.pad(mask, [(0, 0), (0, 0), (0, 0), (0, 1)], constant_values=True)
    bias = jnp.zeros((1, h, 1, t + 1), jnp.float32).at[0, :, 0, t].set(sinks_H.astype(jnp.float32))
    bias = bias.astype(q_BxTxHxDh.dtype)
  out = FUSED[kernel](q_BxTxHxDh, k, v, bias=bias, mask=mask, scale=scale)[..., :e]
  max_logit = None
  if track_max_logit:
    kv = k_BxTxKxDh.shape[2]
    s = jnp.einsum("BTKGd,BSKd->BKGTS", q_BxTxHxDh.reshape(b, t, kv, h // kv, d), k_BxTxKxDh,
                   preferred_element_type=jnp.float32) * scale
    max_logit = jnp.where(mask[:, :, None, :, :t], s, NEG).max(axis=(0, 3, 4)).reshape(h)
  return out, jax.lax.stop_gradient(max_logit) if max_logit is not None else None


def masked_attention(logits_BxQxHxS, values, valid_BxQxS, keys: str):
  """Softmax over an explicit key set: ``(out_BxQxHxDv, lse_BxQxH, max_logit_H)``.

  ``logits`` are already scaled; ``valid`` marks the keys each query may
  see; ``keys`` names the axes of ``values`` before its channel axis: ``"BS"``
  (one key list for all queries) or ``"BQS"`` (gathered per query). A query
  with no valid key gets a zero output and ``lse = NEG``.
  """
  s = jnp.where(valid_BxQxS[:, :, None, :], logits_BxQxHxS.astype(jnp.float32), NEG)
  m = s.max(-1)
  p = jnp.where(valid_BxQxS[:, :, None, :], jnp.exp(s - m[..., None]), 0.0)
  l = p.sum(-1)
  seen = l > 0
  out = jnp.einsum(f"BQHS,{keys}v->BQHv", p / jnp.where(seen, l, 1.0)[..., None],
                   values.astype(jnp.float32))
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)
  return out, lse, jax.lax.stop_gradient(m.max(axis=(0, 1)))


def masked_lse(logits_BxQxHxS, valid_BxQxS, sinks_H=None):
  """float32 [B, Q, H] log-sum-exp of the valid logits (and the sink)."""
  lse = jax.nn.logsumexp(jnp.where(valid_BxQxS[:, :, None], logits_BxQxHxS.astype(jnp.float32), NEG), axis=-1)
  return lse if sinks_H is None else jnp.logaddexp(lse, sinks_H.astype(jnp.float32))


def merge(partials, sinks_H=None):
  """Combines ``[(out_BxTxHxDv, lse_BxTxH), ...]`` over disjoint key sets into one softmax.

  ``out = sum_i out_i * exp(lse_i - lse)`` with ``lse = logsumexp(lse_i, sink)``:
  exactly the attention over the union of the key sets, plus a sink key of
  logit ``sinks_H[h]`` and value 0. Returns ``(out, lse)``.
  """
  lses = [lse for _, lse in partials]
  if sinks_H is not None:
    lses.append(jnp.broadcast_to(sinks_H.astype(jnp.float32), lses[0].shape))
  total = jax.nn.logsumexp(jnp.stack(lses), axis=0)
  out = sum(o.astype(jnp.float32) * jnp.exp(lse - total)[..., None] for o, lse in partials)
  return out.astype(partials[0][0].dtype), total


def causal_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, *, scale: float, window: int = 0,
                     sinks_H=None, kernel: str = "chunked", block: int = 512, track_max_logit: bool = False):
  """Causal (optionally windowed) self-attention with optional sinks.

  Returns ``(out_BxTxHxDv, max_logit_H or None)``; ``kernel`` (see
  ``options.attention_kernel``) ``chunked`` runs :func:`flash_attention`, the
  others :func:`xla_attention` with that fused kernel.
  """
  if kernel != "chunked":
    return xla_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, scale=scale, window=window,
                         sinks_H=sinks_H, track_max_logit=track_max_logit, kernel=kernel)
  out, lse, max_logit = flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, scale=scale,
                                        window=window, block=block)
  if sinks_H is not None:
    out, _ = merge([(out, lse)], sinks_H)
  return out, max_logit


# ----------------------------------------------------------------------------- chunking


def map_query_chunks(fn: Callable, chunk: int, per_query, segment_ids_BxT):
  """Runs ``fn(start, per_query_chunk, segment_ids_chunk)`` over query chunks.

  ``per_query`` is a pytree of [B, T, ...] arrays, sliced into chunks of
  ``chunk`` rows (T padded with padding segment 0). ``fn`` returns
  ``(rows, sums)``: a pytree of [B, chunk, ...] arrays, stitched back to
  [B, T, ...], and a pytree of scalars/arrays summed (max for names starting
  with ``max``) over chunks. Each chunk is rematerialised in the backward
  pass, so memory is O(T) plus one chunk's intermediates; values tagged
  ``checkpoint_name(x, "selection")`` (the indexer's top-k) are kept instead,
  so the backward pass does not redo the selection.
  """
  t = segment_ids_BxT.shape[1]
  chunk = int(min(chunk, t))
  tp = -(-t // chunk) * chunk
  xs = jax.tree.map(lambda x: _blocks(_pad_axis1(x, tp), chunk), (per_query, segment_ids_BxT))

  @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names("selection"))
  def step(_, x):
    i, (chunk_arrays, seg) = x
    return None, fn(i * chunk, chunk_arrays, seg)

  _, (rows, sums) = jax.lax.scan(step, None, (jnp.arange(tp // chunk), xs))
  rows = jax.tree.map(lambda x: _unblocks(x)[:, :t], rows)
  sums = {name: (v.max(0) if name.startswith("max") else v.sum(0)) for name, v in sums.items()}
  return rows, sums


def sow_max_logit(module, max_logit_H, enabled: bool) -> None:
  """The QK-clip contract: float32 [H] max pre-softmax logit, collection ``max_stats``."""
  if enabled:
    module.sow("max_stats", "max_logit", jax.lax.stop_gradient(max_logit_H).astype(jnp.float32))
