"""QK-clip (Kimi K2, 2025, "MuonClip"): cap attention logits by rescaling W_q, W_k.

After the optimizer's update, for each attention module whose largest
pre-softmax logit ``S_h`` of head h exceeded ``tau`` in this step, the head's
query and key projections are scaled so that its logits shrink by
``gamma_h = tau / S_h`` (heads at or under ``tau`` keep ``gamma_h = 1``).

Kimi K2 scales ``W_q^h`` and ``W_k^h`` by ``sqrt(gamma_h)`` each. With
grouped-query attention a key head g is shared by G query heads, so it
cannot take a different factor per query head. Choice made here: the key
head takes ``sqrt(gamma_min_g)`` (the smallest gamma in its group) and query
head h takes ``gamma_h / sqrt(gamma_min_g)``; every head's logits then scale
by exactly ``gamma_h`` (no sibling head is clipped by another's outlier), and
with one query head per key head this is Kimi's sqrt split. A sibling whose
``gamma`` is 1 gets a query factor ``> 1`` that undoes the key's shrink.

Usable with any optimizer: ``optax.chain(tx, qk_clip(tau, logical_axes))``
and ``tx.update(grads, state, params, max_logits={"layer_0/attention":
max_H, ...})`` (the trainer passes what attention layers sow with
``model.attention.track_max_logit``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from moejax.tree_paths import by_path, flatten, path_str


def clip_factors(max_logit_H: jax.Array, tau: float, num_kv_heads: int) -> tuple[jax.Array, jax.Array]:
  """(query factor [H], key factor [K]) so head h's logits scale by min(1, tau / max_h)."""
  m = max_logit_H.astype(jnp.float32)
  gamma_H = jnp.where(m > tau, tau / jnp.where(m > tau, m, 1.0), 1.0)
  gamma_min_K = jnp.min(gamma_H.reshape(num_kv_heads, -1), axis=-1)
  group = gamma_H.shape[0] // num_kv_heads
  return gamma_H / jnp.sqrt(jnp.repeat(gamma_min_K, group)), jnp.sqrt(gamma_min_K)


def _head_axis(axes: Sequence[str | None] | None, ndim: int, name: str) -> int:
  if axes is not None and name in axes:
    return list(axes).index(name)
  return ndim - 2  # [D, H, Dh]


def qk_clip(tau: float, logical_axes=None, params: Sequence[str] = ("w_q", "w_k")) -> optax.GradientTransformationExtraArgs:
  """QK-clip as the last transformation of a chain (``params``: query, key leaf names).

  Needs ``params`` in ``update`` and the extra argument ``max_logits``
  ({module path: float32 [H]}); without it the updates pass unchanged. The
  head axis of a projection is its ``heads`` / ``kv_heads`` logical axis
  (``[D, H, Dh]`` layout assumed without axis names).
  """
  axes_table = by_path(logical_axes)
  query_name, key_name = params

  def update_fn(updates, state, params=None, max_logits=None, **extra):
    del extra
    if not max_logits:
      return updates, state
    if params is None:
      raise ValueError("qk_clip needs params in update()")
    shapes = {path: x.shape for path, x in flatten(params).items()}
    factors = {}
    for module, max_H in max_logits.items():
      q_path, k_path = f"{module}/{query_name}", f"{module}/{key_name}"
      missing = [p for p in (q_path, k_path) if p not in shapes]
      if missing:
        raise ValueError(f"qk_clip: {module} reports max logits but has no {missing}; set "
                         "optim.qk_clip_params to its (query, key) projection names.")
      q_axis = _head_axis(axes_table.get(q_path), len(shapes[q_path]), "heads")
      k_axis = _head_axis(axes_table.get(k_path), len(shapes[k_path]), "kv_heads")
      q_factor_H, k_factor_K = clip_factors(max_H, tau, shapes[k_path][k_axis])
      factors[q_path] = (q_factor_H, q_axis)
      factors[k_path] = (k_factor_K, k_axis)

    def clip(path, u, w):
      if path_str(path) not in factors:
        return u
      factor, axis = factors[path_str(path)]
      shape = [1] * w.ndim
      shape[axis] = factor.shape[0]
      new_w = (w + u) * factor.reshape(shape).astype(w.dtype)
      return (new_w - w).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(clip, updates, params), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
