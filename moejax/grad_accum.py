"""Gradient accumulation as a wrapper (compare levanter's ``grad_accum.microbatched``).

``microbatched(fn, n)(batch)`` splits ``batch`` into ``n`` micro-batches, runs
``fn`` on each inside one ``lax.scan`` and reduces the results: the first
output tree is summed (gradients, loss sums, statistics), the second maxed
(per-head max attention logits). Memory holds one micro-batch's activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Batch = dict[str, jax.Array]


def split_micro(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...]; micro-batch i takes rows i, i+n, ..., so each
  device keeps its own rows in every micro-batch."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def first_micro(batch: Batch, n: int) -> Batch:
  """Micro-batch 0 of :func:`split_micro` (rows 0, n, 2n, ...)."""
  return jax.tree.map(lambda x: x[0], split_micro(batch, n))


def microbatched(fn: Callable[[Batch], tuple[Any, Any]], n: int) -> Callable[[Batch], tuple[Any, Any]]:
  """``fn(micro) -> (summed, maxed)`` over ``n`` micro-batches of a batch: returns
  ``batched(batch) -> (sum of summed, max of maxed)`` (sums start at 0, maxima at -inf)."""

  def batched(batch: Batch):
    micros = split_micro(batch, n)
    sum_shapes, max_shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micros))
    init = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes),
            jax.tree.map(lambda s: jnp.full(s.shape, -jnp.inf, s.dtype), max_shapes))

    def accumulate(carry, micro: Batch):
      sums, maxima = carry
      micro_sums, micro_maxima = fn(micro)
      return (jax.tree.map(jnp.add, sums, micro_sums), jax.tree.map(jnp.maximum, maxima, micro_maxima)), None

    return jax.lax.scan(accumulate, init, micros)[0]

  return batched
