"""Context parallelism: attention over a sequence sharded along the mesh axis ``context``.

The sequence axis of every activation is sharded over ``context`` (logical
``act_length``; the batch arrives split into C contiguous shards of L = T / C
tokens). Token-wise layers (projections, norms, MLP, MoE, the loss) need no
communication; attention does, and each part of it exchanges the least it can:

* dense / mla / dsa-warm-up core — **ring attention** (Liu et al., 2023):
  ``jax.shard_map`` over ``context``; KV blocks travel around the ring with
  ``lax.ppermute`` (issued before the block compute so XLA overlaps them) and
  the partial softmaxes combine exactly by log-sum-exp (``core.merge``).
  **Causal load balancing (zigzag)**: inside the ring the sequence is viewed
  as 2C half-chunks and device d holds half-chunks d and 2C-1-d (two
  ``ppermute`` in, two out), so every off-diagonal ring step is exactly half
  a block of visible work on every device: no device idles.
* sliding / swa and the window of csa / hca — a **halo**: the previous shard's
  last ``window`` keys (one ``ppermute``), then local attention. Needs
  ``window <= L``.
* compressed entries (csa / hca) and DSA's indexer + latent keys — an
  **all-gather** of the narrow per-entry/per-token keys (``shard_map`` input
  replicated over ``context``), then each device runs its own query chunks
  (:func:`map_query_chunks`).

The data layout stays contiguous, so positions, segment ids, targets, the
compressors' pooling windows and MTP's shifted targets need no permutation;
the zigzag re-layout is a detail of the ring kernel, invisible outside it.
Without a ``context`` axis (or with ``mesh.context == 1``) every function here
is the single-device one from ``core.py``: no ``shard_map``, the same HLO.

Batch rows stay sharded over data/fsdp/expert and heads over ``tensor`` where
the head counts divide it (see :func:`_specs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.layers.attention import core
from moejax.sharding import BATCH_AXES

AXIS = "context"


def context_size(seq_len: int | None = None) -> int:
  """Devices along ``context`` in the current mesh (1 if none, or if ``seq_len`` does not split in 2C)."""
  mesh = jax.sharding.get_abstract_mesh()
  c = 1 if mesh.empty else mesh.shape.get(AXIS, 1)
  if seq_len is not None and seq_len % (2 * c):
    return 1
  return c


def _batch_axes(batch: int):
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
  return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else None


def _head_axis(num_heads: int, num_kv_heads: int):
  """``tensor`` if q heads and kv heads both split over it (one shared kv head always does)."""
  t = jax.sharding.get_abstract_mesh().shape.get("tensor", 1)
  ok = t > 1 and num_heads % t == 0 and (num_kv_heads == 1 or num_kv_heads % t == 0)
  return "tensor" if ok else None


def _specs(q_BxTxHxDh, k_BxTxKxDh):
  """Specs of a kernel call: (q/out, k/v, segment ids, lse, [H] max logit), and the axes to reduce maxima over."""
  batch = _batch_axes(q_BxTxHxDh.shape[0])
  heads = _head_axis(q_BxTxHxDh.shape[2], k_BxTxKxDh.shape[2])
  kv_heads = heads if k_BxTxKxDh.shape[2] > 1 else None
  return (P(batch, AXIS, heads), P(batch, AXIS, kv_heads), P(batch, AXIS), P(batch, AXIS, heads), P(heads),
          tuple(a for a in (*(batch or ()), AXIS)))


# ----------------------------------------------------------------------------- kernels per device


def cross_attention(q_BxQxHxDh, k_BxSxKxDh, v_BxSxKxDv, q_idx_Q, k_idx_S, q_seg_BxQ, k_seg_BxS, *, scale: float,
                    window: int = 0, block: int = 512):
  """Attention of queries to a disjoint key set given by global indices: ``(out, lse, max_logit_H)``.

  ``core.visible`` on the global indices decides the mask (causal, window,
  same document). Queries are processed ``block``-row chunks at a time
  (scores [B, chunk, H, S], rematerialised in the backward pass); a query
  with no visible key gets ``lse = NEG`` and a zero output.
  """
  _, s, kv, d = k_BxSxKxDh.shape
  h = q_BxQxHxDh.shape[2]
  k_idx_S = jnp.asarray(k_idx_S)

  def chunk(start, xs, seg_BxQ):
    q, q_idx = xs
    valid_BxQxS = core.visible(q_idx[0], k_idx_S, seg_BxQ, k_seg_BxS, window)
    q = q.reshape(*q.shape[:2], kv, h // kv, d)
    logits = jnp.einsum("BQKGd,BSKd->BQKGS", q, k_BxSxKxDh, preferred_element_type=jnp.float32) * scale
    logits = logits.reshape(*q.shape[:2], h, s)
    if kv == 1:  # MQA (V4, absorbed MLA): one value list for every head
      out, lse, max_logit = core.masked_attention(logits, v_BxSxKxDv[:, :, 0], valid_BxQxS, "BS")
    else:        # GQA: head h reads kv head h // (H / K)
      values_BxSxHxDv = jnp.repeat(v_BxSxKxDv, h // kv, axis=2)
      out, lse, max_logit = core.masked_attention(logits, values_BxSxHxDv, valid_BxQxS, "BSH")
    return (out.astype(q.dtype), lse), {"max_logit": max_logit}

  q_idx_BxQ = jnp.broadcast_to(jnp.asarray(q_idx_Q), q_BxQxHxDh.shape[:2])
  (out, lse), sums = core.map_query_chunks(chunk, core.chunk_rows(block, s * h), (q_BxQxHxDh, q_idx_BxQ),
                                           q_seg_BxQ)
  return out, lse, sums["max_logit"]


def _empty(q_BxQxHxDh, v_BxSxKxDv):
  b, n, h, _ = q_BxQxHxDh.shape
  return (jnp.zeros((b, n, h, v_BxSxKxDv.shape[-1]), q_BxQxHxDh.dtype), jnp.full((b, n, h), core.NEG, jnp.float32),
          jnp.full((h,), core.NEG, jnp.float32))


def _merge(a, b):
  out, lse = core.merge([a[:2], b[:2]])
  return out, lse, jnp.maximum(a[2], b[2])


def _zigzag_perms(c: int):
  """ppermute pairs sending each device's first / second half-chunk to its zigzag owner."""
  owner = lambda h: h if h < c else 2 * c - 1 - h
  return [(e, owner(2 * e)) for e in range(c)], [(e, owner(2 * e + 1)) for e in range(c)]


def _to_zigzag(x, c: int):
  """Contiguous [B, L, ...] shard (half-chunks 2d, 2d+1) -> zigzag (half-chunks d, 2C-1-d)."""
  perm0, perm1 = _zigzag_perms(c)
  half = x.shape[1] // 2
  r0, r1 = jax.lax.ppermute(x[:, :half], AXIS, perm0), jax.lax.ppermute(x[:, half:], AXIS, perm1)
  even = jax.lax.axis_index(AXIS) % 2 == 0  # half-chunk d is even iff it came through perm0
  return jnp.where(even, jnp.concatenate([r0, r1], 1), jnp.concatenate([r1, r0], 1))


def _from_zigzag(x, c: int):
  perm0, perm1 = _zigzag_perms(c)
  inv = lambda perm: [(dst, src) for src, dst in perm]
  half = x.shape[1] // 2
  even = jax.lax.axis_index(AXIS) % 2 == 0
  first, second = x[:, :half], x[:, half:]
  a = jax.lax.ppermute(jnp.where(even, first, second), AXIS, inv(perm0))
  b = jax.lax.ppermute(jnp.where(even, second, first), AXIS, inv(perm1))
  return jnp.concatenate([a, b], 1)


def _zigzag_index(d, c: int, half: int):
  """Global token indices of device d's zigzag half-chunks d and 2C-1-d, [2 * half]."""
  r = jnp.arange(half)
  return jnp.concatenate([d * half + r, (2 * c - 1 - d) * half + r])


def _ring_local(q, k, v, seg, *, c: int, scale: float, block: int):
  """One device's ring attention over zigzag-laid-out q, k, v (see module doc)."""
  q, k, v, seg = (_to_zigzag(x, c) for x in (q, k, v, seg))
  d = jax.lax.axis_index(AXIS)
  half = q.shape[1] // 2
  q_idx = _zigzag_index(d, c, half)
  # Step 0: the local block. Its half-chunks are in global order, so the causal
  # kernel on local positions is exactly the global causal mask.
  acc = core.flash_attention(q, k, v, seg, scale=scale, block=block)
  ring = [(i, (i + 1) % c) for i in range(c)]
  kv = (k, v, seg)
  for step in range(1, c):
    kv = tuple(jax.lax.ppermute(x, AXIS, ring) for x in kv)  # issued before this step's compute
    k_s, v_s, seg_s = kv
    e = (d - step) % c
    k_idx = _zigzag_index(e, c, half)

    def early(k_s=k_s, v_s=v_s, seg_s=seg_s, k_idx=k_idx):  # e < d: all queries see e's first half-chunk
      return cross_attention(q, k_s[:, :half], v_s[:, :half], q_idx, k_idx[:half], seg, seg_s[:, :half],
                             scale=scale, block=block)

    def late(k_s=k_s, v_s=v_s, seg_s=seg_s, k_idx=k_idx):  # e > d: only the late half-chunk sees e's keys
      part = cross_attention(q[:, half:], k_s, v_s, q_idx[half:], k_idx, seg[:, half:], seg_s,
                             scale=scale, block=block)
      none = _empty(q[:, :half], v)
      return (jnp.concatenate([none[0], part[0]], 1), jnp.concatenate([none[1], part[1]], 1), part[2])

    acc = _merge(acc, jax.lax.cond(e < d, early, late))
  out, lse, max_logit = acc
  return _from_zigzag(out, c), _from_zigzag(lse, c), max_logit


def _halo_local(q, k, v, seg, *, c: int, scale: float, window: int, block: int):
  """One device's sliding-window attention: local causal block + the previous shard's last ``window`` keys."""
  d = jax.lax.axis_index(AXIS)
  l = q.shape[1]
  shift = [(i, i + 1) for i in range(c - 1)]  # device 0 receives zeros: segment 0, seen by no real query
  halo = [jax.lax.ppermute(x[:, l - window:], AXIS, shift) for x in (k, v, seg)]
  q_idx = d * l + jnp.arange(l)
  local = core.flash_attention(q, k, v, seg, scale=scale, window=window, block=block)
  edge = cross_attention(q, halo[0], halo[1], q_idx, d * l - window + jnp.arange(window), seg, halo[2],
                         scale=scale, window=window, block=block)
  return _merge(local, edge)


# ----------------------------------------------------------------------------- public entry points


def flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, *, scale: float, window: int = 0,
                    block: int = 512):
  """``core.flash_attention`` (same signature and outputs) over a ``context``-sharded sequence.

  Ring attention with zigzag load balancing for ``window == 0``, a halo of
  ``window`` keys otherwise; exactly ``core.flash_attention`` without a
  context axis.
  """
  t = q_BxTxHxDh.shape[1]
  c = context_size(t)
  if c == 1:
    return core.flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, scale=scale, window=window,
                                block=block)
  if window > t // c:
    raise ValueError(f"attention.window={window} exceeds the {t // c} tokens per context shard "
                     f"(T={t}, mesh.context={c}); lower mesh.context or the window.")
  q_spec, kv_spec, seg_spec, lse_spec, h_spec, reduce_axes = _specs(q_BxTxHxDh, k_BxTxKxDh)

  def local(q, k, v, seg):
    if window:
      out, lse, m = _halo_local(q, k, v, seg, c=c, scale=scale, window=window, block=block)
    else:
      out, lse, m = _ring_local(q, k, v, seg, c=c, scale=scale, block=block)
    return out, lse, jax.lax.pmax(jax.lax.stop_gradient(m), reduce_axes)  # max logits carry no gradient

  return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=(q_spec, lse_spec, h_spec), check_vma=False)(
                           q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT)


def causal_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, *, scale: float, window: int = 0,
                     sinks_H=None, kernel: str = "chunked", block: int = 512, track_max_logit: bool = False):
  """``core.causal_attention`` over a ``context``-sharded sequence (the fused kernels are single-device only)."""
  if context_size(q_BxTxHxDh.shape[1]) == 1:
    return core.causal_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, scale=scale, window=window,
                                 sinks_H=sinks_H, kernel=kernel, block=block, track_max_logit=track_max_logit)
  out, lse, max_logit = flash_attention(q_BxTxHxDh, k_BxTxKxDh, v_BxTxKxDv, segment_ids_BxT, scale=scale,
                                        window=window, block=block)
  if sinks_H is not None:
    out, _ = core.merge([(out, lse)], sinks_H)
  return out, jax.lax.stop_gradient(max_logit) if track_max_logit else None


def map_query_chunks(fn: Callable, chunk: int, per_query, segment_ids_BxT, shared=()):
  """``core.map_query_chunks`` with ``fn(start, per_query_chunk, seg_chunk, shared)``, context-parallel.

  ``shared`` is a pytree of [B, S, ...] arrays every query may read (compressed
  entries, indexer keys, latent keys, the key segment ids): under a context
  axis it is all-gathered over ``context`` and each device maps its own query
  rows, with ``start`` the global index of the chunk's first query; ``sums``
  are then summed (maxed for ``max*``) over devices.
  """
  t = segment_ids_BxT.shape[1]
  c = context_size(t)
  if c == 1:
    return core.map_query_chunks(lambda s, x, seg: fn(s, x, seg, shared), chunk, per_query, segment_ids_BxT)
  batch = _batch_axes(segment_ids_BxT.shape[0])
  reduce_axes = tuple(a for a in (*(batch or ()), AXIS))
  rows_spec, shared_spec = P(batch, AXIS), P(batch)

  def local(per_query, seg, shared):
    offset = jax.lax.axis_index(AXIS) * (t // c)
    rows, sums = core.map_query_chunks(lambda s, x, sg: fn(offset + s, x, sg, shared), min(chunk, t // c),
                                       per_query, seg)
    sums = {k: (jax.lax.pmax(jax.lax.stop_gradient(v), reduce_axes) if k.startswith("max") else jax.lax.psum(v, reduce_axes))
            for k, v in sums.items()}
    return rows, sums

  return jax.shard_map(local, in_specs=(rows_spec, rows_spec, shared_spec), out_specs=(rows_spec, P()),
                       check_vma=False)(per_query, segment_ids_BxT, shared)
