"""Token losses computed in sequence chunks, never holding ``[B, T, V]`` logits.

At long T the logits dominate memory (1M tokens x 32k vocab x 4 bytes =
128 GiB). These functions take the final hidden states ``x_BxTxD`` and the
output matrix ``head_DxV``, form logits for ``chunk`` positions at a time
inside a rematerialized ``lax.scan``, and keep only per-token results, so
forward and backward memory is O(B * chunk * V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunks(x_BxT_, chunk: int):
  """[B, T, ...] -> [T/chunk, B, chunk, ...] (T padded up to a multiple of chunk)."""
  b, t = x_BxT_.shape[:2]
  n = -(-t // chunk)
  pad = [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x_BxT_.ndim - 2)
  x = jnp.pad(x_BxT_, pad)
  return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)


def chunked_token_stats(x_BxTxD, head_DxV, targets_BxT, chunk: int):
  """Per-token cross-entropy and argmax-correctness, chunk by chunk.

  Returns ``(ce_BxT, correct_BxT)`` in float32, where ``ce = logsumexp(l) -
  l[target]`` for logits ``l = x @ head`` (softmax in float32).
  """
  b, t, _ = x_BxTxD.shape
  chunk = max(1, min(chunk, t))

  @jax.checkpoint
  def one(x_BxCxD, y_BxC):
    logits_BxCxV = jnp.einsum("BCD,DV->BCV", x_BxCxD, head_DxV).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits_BxCxV, y_BxC[..., None], axis=-1)[..., 0]
    ce = jax.nn.logsumexp(logits_BxCxV, axis=-1) - target_logit
    correct = (jnp.argmax(logits_BxCxV, axis=-1) == y_BxC).astype(jnp.float32)
    return ce, correct

  def body(carry, xs):
    return carry, one(*xs)

  _, (ce, correct) = jax.lax.scan(body, None, (_chunks(x_BxTxD, chunk), _chunks(targets_BxT, chunk)))
  unchunk = lambda a: jnp.swapaxes(a, 0, 1).reshape(b, -1)[:, :t]
  return unchunk(ce), unchunk(correct)


def chunked_distill_kl(xs_BxTxD, head_s_DxV, xt_BxTxD, head_t_DxV, temperature: float, reverse: bool,
                       chunk: int):
  """Per-token KL between teacher and student over the *full* vocabulary.

  Both distributions are softened by ``temperature``: ``p = softmax(l / T)``.
  Forward (``reverse=False``): ``KL(p_teacher || p_student)``; reverse:
  ``KL(p_student || p_teacher)``. Returns float32 [B, T]. The teacher side
  is treated as a constant (no gradient flows into it).
  """
  b, t, _ = xs_BxTxD.shape
  chunk = max(1, min(chunk, t))

  @jax.checkpoint
  def one(xs_BxCxD, xt_BxCxD):
    ls = jnp.einsum("BCD,DV->BCV", xs_BxCxD, head_s_DxV).astype(jnp.float32) / temperature
    lt = jnp.einsum("BCD,DV->BCV", xt_BxCxD, head_t_DxV).astype(jnp.float32) / temperature
    logp_s = jax.nn.log_softmax(ls, axis=-1)
    logp_t = jax.lax.stop_gradient(jax.nn.log_softmax(lt, axis=-1))
    if reverse:
      return jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)

  def body(carry, xs):
    return carry, one(*xs)

  _, kl = jax.lax.scan(body, None, (_chunks(xs_BxTxD, chunk), _chunks(xt_BxTxD, chunk)))
  return jnp.swapaxes(kl, 0, 1).reshape(b, -1)[:, :t]
