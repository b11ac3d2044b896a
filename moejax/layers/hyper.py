"""Manifold-constrained hyper-connections (mHC): N residual streams per token.

The residual stream of every token is widened to N parallel streams
``h_BxTxNxD``. Around each sublayer ``f`` (attention or MLP) per-token weights
computed from the streams themselves collapse them into the sublayer's input
and spread its output back:

  x = sum_n pre_n h_n,        h'_k = post_k * f(norm(x)) + sum_j comb_jk h_j

with ``pre`` in (0, 1), ``post`` in (0, 2) and ``comb`` (N x N) projected onto
the doubly-stochastic matrices by Sinkhorn-Knopp, so the stream mixing is
non-expansive however deep the stack. The embedding enters as N identical
streams (:func:`expand_streams`) and :class:`HyperHead` collapses them before
the final norm.

Hyper-connections: Zhu et al., 2024 (arXiv:2409.19606); the manifold
constraint (mHC): Xie et al., 2026, as used by DeepSeek-V4. The numerics follow
transformers' ``DeepseekV4HyperConnection`` / ``DeepseekV4HyperHead`` exactly
(order of operations, epsilons, float32 math, the transposed ``comb``), so
converted V4 checkpoints give the same logits. Parameter layouts, for
conversion from a torch ``fn`` of shape ``[M, N*D]``: ``fn_NxDxM =
fn.T.reshape(N, D, M)``.

mHC parameters are kept in float32 whatever ``model.param_dtype`` (as V4 does);
they are a few ``N * D * (N + 2) * N`` numbers per sublayer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

_STREAMS_ACT = ("act_batch", "act_length", None, "act_embed")


def expand_streams(x_BxTxD: jax.Array, streams: int) -> jax.Array:
  """x_BxTxD -> N identical streams h_BxTxNxD (``streams == 1``: x unchanged)."""
  if streams == 1:
    return x_BxTxD
  b, t, d = x_BxTxD.shape
  return nn.with_logical_constraint(jnp.broadcast_to(x_BxTxD[:, :, None, :], (b, t, streams, d)), _STREAMS_ACT)


def sinkhorn(comb_xNxN: jax.Array, iters: int, eps: float) -> jax.Array:
  """Sinkhorn-Knopp towards a doubly-stochastic matrix over the last two axes.

  One column normalisation, then ``iters - 1`` (row, column) rounds; each
  divides by ``sum + eps``. Columns sum to 1 (up to eps) on return, rows to 1
  as the iteration converges.
  """
  # The rounds run on [N, N, ...]: sums over the two leading axes add whole
  # slabs, where sums over two trailing axes of size N vectorize poorly (12x
  # slower on CPU; on TPU an [..., N, N] minor layout pads N to the lane width).
  # A loop, not unrolled: rounds x sublayers would bloat compile time.
  normalize = lambda c, axis: c / (jnp.sum(c, axis=axis, keepdims=True) + eps)
  rounds = lambda _, c: normalize(normalize(c, 1), 0)
  comb_NxNx = jnp.moveaxis(comb_xNxN, (-2, -1), (0, 1))
  comb_NxNx = jax.lax.fori_loop(0, iters - 1, rounds, normalize(comb_NxNx, 0))
  return jnp.moveaxis(comb_NxNx, (0, 1), (-2, -1))


def _unweighted_rms_norm(h_BxTxNxD: jax.Array, eps: float) -> jax.Array:
  """RMSNorm without a scale over the flattened N*D streams, float32."""
  h32 = h_BxTxNxD.astype(jnp.float32)
  return h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=(-2, -1), keepdims=True) + eps)


def _collapse(pre_BxTxN: jax.Array, h_BxTxNxD: jax.Array) -> jax.Array:
  """sum_n pre_n h_n, in float32, cast back to the streams' dtype."""
  x = jnp.einsum("BTN,BTND->BTD", pre_BxTxN, h_BxTxNxD.astype(jnp.float32))
  return nn.with_logical_constraint(x.astype(h_BxTxNxD.dtype), ("act_batch", "act_length", "act_embed"))


class HyperConnection(nn.Module):
  """The mHC weights around one sublayer, and the collapsed sublayer input.

  h_BxTxNxD -> (post_BxTxN, comb_BxTxNxN, x_BxTxD), all weights float32:

    m = RMSNorm(flatten(h)) @ fn;  pre = sigmoid(s0 m_pre + b_pre) + eps;
    post = 2 sigmoid(s1 m_post + b_post);
    comb = Sinkhorn(softmax(s2 m_comb + b_comb) + eps);  x = sum_n pre_n h_n.

  Combine with the sublayer output through :func:`mix_streams`.
  """

  cfg: ml_collections.FrozenConfigDict  # the model config: hc.{sinkhorn_iters, eps}, norm_eps, init_std

  @nn.compact
  def __call__(self, h_BxTxNxD):
    hc = self.cfg.hc
    n, d = h_BxTxNxD.shape[-2:]
    m = (2 + n) * n
    fn_NxDxM = self.param("fn", nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std),
                                                             (None, "embed", None)), (n, d, m), jnp.float32)
    base_M = self.param("base", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (m,), jnp.float32)
    scale_3 = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (3,), jnp.float32)

    mixes_BxTxM = jnp.einsum("BTND,NDM->BTM", _unweighted_rms_norm(h_BxTxNxD, self.cfg.norm_eps), fn_NxDxM)
    pre_w, post_w, comb_w = jnp.split(mixes_BxTxM, [n, 2 * n], axis=-1)
    pre_b, post_b, comb_b = jnp.split(base_M, [n, 2 * n])
    comb_w = comb_w.reshape(*comb_w.shape[:-1], n, n)

    pre_BxTxN = jax.nn.sigmoid(pre_w * scale_3[0] + pre_b) + hc.eps
    post_BxTxN = 2.0 * jax.nn.sigmoid(post_w * scale_3[1] + post_b)
    comb_BxTxNxN = jax.nn.softmax(comb_w * scale_3[2] + comb_b.reshape(n, n), axis=-1) + hc.eps
    comb_BxTxNxN = sinkhorn(comb_BxTxNxN, hc.sinkhorn_iters, hc.eps)
    return post_BxTxN, comb_BxTxNxN, _collapse(pre_BxTxN, h_BxTxNxD)


def mix_streams(h_BxTxNxD, y_BxTxD, post_BxTxN, comb_BxTxNxN):
  """New streams ``h'_k = post_k * y + sum_j comb_jk h_j`` (comb transposed).

  Weights are cast to the streams' dtype first, as DeepSeek-V4 does.
  """
  dtype = h_BxTxNxD.dtype
  spread = post_BxTxN.astype(dtype)[..., None] * y_BxTxD.astype(dtype)[:, :, None, :]
  mixed = jnp.einsum("BTJK,BTJD->BTKD", comb_BxTxNxN.astype(dtype), h_BxTxNxD)
  return nn.with_logical_constraint(spread + mixed, _STREAMS_ACT)


class HyperHead(nn.Module):
  """Final collapse of the streams before the final norm.

  h_BxTxNxD -> x_BxTxD:  pre = sigmoid(s RMSNorm(flatten(h)) @ fn + b) + eps,
  x = sum_n pre_n h_n (float32 weights).
  """

  cfg: ml_collections.FrozenConfigDict  # the model config: hc.eps, norm_eps, init_std

  @nn.compact
  def __call__(self, h_BxTxNxD):
    n, d = h_BxTxNxD.shape[-2:]
    fn_NxDxN = self.param("fn", nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std),
                                                             (None, "embed", None)), (n, d, n), jnp.float32)
    base_N = self.param("base", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (n,), jnp.float32)
    scale_1 = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,), jnp.float32)
    mixes_BxTxN = jnp.einsum("BTND,NDM->BTM", _unweighted_rms_norm(h_BxTxNxD, self.cfg.norm_eps), fn_NxDxN)
    pre_BxTxN = jax.nn.sigmoid(mixes_BxTxN * scale_1 + base_N) + self.cfg.hc.eps
    return _collapse(pre_BxTxN, h_BxTxNxD)


def collapse_streams(cfg: ml_collections.FrozenConfigDict, h, name: str = "hc_head") -> jax.Array:
  """h_BxTxNxD -> x_BxTxD through a :class:`HyperHead` (``streams == 1``: h unchanged).

  Call inside a compact method: the head becomes a child of the caller.
  """
  return h if cfg.hc.streams == 1 else HyperHead(cfg, name=name)(h)
