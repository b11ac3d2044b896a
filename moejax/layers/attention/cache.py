"""Decode caches: what every attention type's ``decode`` method shares.

An attention type decodes with ``attn.decode(x_BxCxD, positions_BxC,
segment_ids_BxC, max_len) -> y_BxCxD`` (``Transformer(..., decode_len=max_len)``
calls it): a chunk of C new tokens per row, ``segment_ids > 0`` marking the
real ones, which come first in the row (prompts of different lengths leave
padding after a row's last token). The cache lives in the Linen ``cache``
collection (apply with ``mutable=["cache"]``); its shapes are fixed by
``max_len`` when the first call creates it (all zeros = empty).

Each row has its own fill level ``index_B`` (tokens cached so far); the
chunk's tokens sit at absolute positions ``index + 0..C-1`` (the caller passes
the same ``positions`` for rope). Key buffers are rings of ``size`` slots:
position p lives in slot ``p % size``. With ``size = max_len`` a ring never
wraps (dense caches); with ``size = window`` it keeps exactly the keys a
sliding window can still see. A chunk attends over ``[old buffer | chunk]``
(so a chunk longer than the window still sees every key it needs) and is
then written into the buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.attention import core


class Step(NamedTuple):
  """One decode call's bookkeeping (per row): where the chunk starts and which tokens are real."""

  index_B: jax.Array      # int32: tokens cached before this chunk
  count_B: jax.Array      # int32: real tokens in this chunk
  q_pos_BxC: jax.Array    # int32: absolute positions of the chunk's tokens
  q_seg_BxC: jax.Array    # int32: 1 for a real token, 0 for padding


def begin(module: nn.Module, segment_ids_BxC) -> Step:
  """Reads ``module``'s fill level (cache variable ``index [B]``) and advances it by the chunk."""
  b, c = segment_ids_BxC.shape
  index = module.variable("cache", "index", jnp.zeros, (b,), jnp.int32)
  real_BxC = segment_ids_BxC > 0
  step = Step(index.value, jnp.sum(real_BxC, axis=1).astype(jnp.int32),
              index.value[:, None] + jnp.arange(c, dtype=jnp.int32), real_BxC.astype(jnp.int32))
  index.value = step.index_B + step.count_B
  return step


def slot_positions(index_B, size: int):
  """int32 [B, size]: the position held by each ring slot (-1 if empty)."""
  last = index_B[:, None] - 1
  pos = last - jnp.mod(last - jnp.arange(size), size)
  return jnp.where(pos >= 0, pos, -1)


def extend(module: nn.Module, name: str, step: Step, new_BxCx_, size: int):
  """``[old buffer | chunk]`` [B, size + C, ...]; writes the chunk's real tokens into the ring.

  A token is written only if no later token of the same chunk takes its slot
  (a chunk longer than ``size``), so scatter order never matters.
  """
  b, c = new_BxCx_.shape[:2]
  buf = module.variable("cache", name, jnp.zeros, (b, size, *new_BxCx_.shape[2:]), new_BxCx_.dtype)
  old = buf.value
  end_B = step.index_B + step.count_B
  keep_BxC = (step.q_seg_BxC > 0) & (step.q_pos_BxC >= end_B[:, None] - size)
  slot_BxC = jnp.where(keep_BxC, step.q_pos_BxC % size, size)  # out of range: dropped
  buf.value = old.at[jnp.arange(b)[:, None], slot_BxC].set(new_BxCx_.astype(old.dtype), mode="drop")
  return jnp.concatenate([old, new_BxCx_.astype(old.dtype)], axis=1)


def keys(step: Step, size: int):
  """(positions, segments) int32 [B, size + C] of :func:`extend`'s ``[old buffer | chunk]``.

  Empty slots get segment -1, so no query (real: 1, padding: 0) sees them.
  """
  pos_BxS = slot_positions(step.index_B, size)
  return (jnp.concatenate([pos_BxS, step.q_pos_BxC], axis=1),
          jnp.concatenate([jnp.where(pos_BxS >= 0, 1, -1), step.q_seg_BxC], axis=1))


def visible(step: Step, size: int, window: int = 0):
  """Bool [B, C, size + C]: which keys of ``[old buffer | chunk]`` each query sees (``core.visible``)."""
  k_pos_BxS, k_seg_BxS = keys(step, size)
  return core.visible(step.q_pos_BxC, k_pos_BxS, step.q_seg_BxC, k_seg_BxS, window)


def attend(q_BxCxHxDh, k_BxSxKxDh, v_BxSxKxDv, valid_BxCxS, *, scale: float, block: int):
  """GQA softmax over explicit keys, one key block at a time: (out_BxCxHxDv, lse_BxCxH).

  Each block is :func:`core.masked_attention` (kv heads folded into the
  batch); blocks combine with :func:`core.merge`, so memory is
  O(C * H * block), never [C, S]. No sinks here: merge them afterwards.
  """
  b, c, h, d = q_BxCxHxDh.shape
  s, kv = k_BxSxKxDh.shape[1], k_BxSxKxDh.shape[2]
  block = int(min(block, s))
  sp = -(-s // block) * block
  pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, sp - s)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  fold = lambda x: jnp.moveaxis(x, 2, 1).reshape(b * kv, sp, x.shape[-1])           # [B*K, S, Dh]
  k, v = fold(pad(k_BxSxKxDh)), fold(pad(v_BxSxKxDv))
  valid = jnp.repeat(pad(jnp.moveaxis(valid_BxCxS, 2, 1), False), kv, axis=0)      # [B*K, S, C]
  q = jnp.moveaxis(q_BxCxHxDh.reshape(b, c, kv, h // kv, d), 2, 1).reshape(b * kv, c, h // kv, d)

  def key_block(carry, j):
    k_j, v_j = (jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1) for x in (k, v))
    valid_j = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(valid, j * block, block, axis=1), 1, 2)
    logits = jnp.einsum("BQGd,BSd->BQGS", q, k_j, preferred_element_type=jnp.float32) * scale
    out, lse, _ = core.masked_attention(logits, v_j, valid_j, "BS")
    return core.merge([carry, (out, lse)]), None

  e = v_BxSxKxDv.shape[-1]
  init = (jnp.zeros((b * kv, c, h // kv, e), jnp.float32), jnp.full((b * kv, c, h // kv), core.NEG, jnp.float32))
  (out, lse), _ = jax.lax.scan(key_block, init, jnp.arange(sp // block))
  unfold = lambda x: jnp.moveaxis(x.reshape(b, kv, c, h // kv, *x.shape[3:]), 1, 2).reshape(b, c, h, *x.shape[3:])
  return unfold(out).astype(v_BxSxKxDv.dtype), unfold(lse)
