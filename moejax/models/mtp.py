"""Multi-token prediction (DeepSeek-V3 §2.2): sequential MTP modules.

Module k (k = 1..D, D = ``model.mtp.depth``) predicts token ``t_{i+k+1}`` at
position i. It combines the previous depth's representation with the
embedding of token ``t_{i+k}``, runs one Transformer block and feeds the
*shared* output head:

  h'^k_i = W_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],   h^k = RMSNorm(Block_k(h'^k)),
  L_MTP = lambda / D * sum_k CE(softmax(h^k head), t_{i+k+1}).

``h^0`` is the main model's final normed hidden state (what its output head
sees) and every ``h^k`` is likewise normed. The embedding and output head
are the main model's. ``W_k`` is one ``[2D, D]`` matrix whose first D input
rows act on the embedding (the layout of the released V3 ``eh_proj``). The
block is the model's own ``Block`` (attention/MLP types from
``model.mtp.attention_type``/``mlp_type``, residual from ``model.hc``), and
its MLP sees the token ids ``t_{i+k}`` (for hash routing).

Sequences keep length T at every depth; positions whose depth-k target lies
past the row or in another packed document get weight 0
(:func:`mtp_targets`). Position i of module k reads tokens up to ``t_{i+k}``
only, so no target leaks into its own prediction.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.config import expand_schedule
from moejax.layers import DTYPES
from moejax.layers.hyper import collapse_streams, expand_streams
from moejax.layers.norms import RMSNorm
from moejax.models.block import ACT, block_class


def shift_left(x_BxT: jax.Array, k: int, fill=0) -> jax.Array:
  """y[:, t] = x[:, t + k] for t + k < T, else ``fill``."""
  x_BxT = jnp.asarray(x_BxT)
  b, t = x_BxT.shape
  k = min(k, t)
  return jnp.concatenate([x_BxT[:, k:], jnp.full((b, k), fill, x_BxT.dtype)], axis=1)


def mtp_targets(targets_BxT, weights_BxT, segment_ids_BxT, depth: int) -> tuple[jax.Array, jax.Array]:
  """Depth-k targets and weights for k = 1..depth, from one packed batch.

  Returns ``(targets_BxLxT, weights_BxLxT)`` (L = depth): at position t,
  depth k predicts ``targets[t + k]`` (= token t+k+1) with weight
  ``weights[t + k]`` if t + k < T and positions t and t + k lie in the same
  document (``segment_ids`` equal), else 0. Nothing past the row is used.
  """
  b, t = targets_BxT.shape
  if depth == 0:
    return jnp.zeros((b, 0, t), targets_BxT.dtype), jnp.zeros((b, 0, t), jnp.float32)
  ks = range(1, depth + 1)
  same_doc = [shift_left(segment_ids_BxT, k, fill=-1) == segment_ids_BxT for k in ks]
  targets = jnp.stack([shift_left(targets_BxT, k) for k in ks], axis=1)
  weights = jnp.stack([jnp.where(same, shift_left(weights_BxT, k), 0) for k, same in zip(ks, same_doc)], axis=1)
  return targets, weights.astype(jnp.float32)


class MTPModule(nn.Module):
  """One MTP depth: (h^{k-1}_BxTxD, ids t_{i+k} as ids_BxT) -> h^k_BxTxD (normed).

  ``embed_VxD`` is the main model's embedding (shared, not a parameter here).
  """

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, h_BxTxD, ids_BxT, embed_VxD, positions_BxT, segment_ids_BxT):
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    norm = lambda name: RMSNorm(cfg.norm_eps, dtype, pdtype, name=name)
    e_BxTxD = norm("embed_norm")(nn.with_logical_constraint(jnp.take(embed_VxD, ids_BxT, axis=0).astype(dtype), ACT))
    d = cfg.d_model
    w_proj_2DxD = self.param("eh_proj", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                     (None, "embed")), (2 * d, d), pdtype)
    eh_BxTx2D = jnp.concatenate([e_BxTxD, norm("hidden_norm")(h_BxTxD)], axis=-1)
    x_BxTxD = nn.with_logical_constraint(jnp.einsum("BTC,CD->BTD", eh_BxTx2D, w_proj_2DxD.astype(dtype)), ACT)
    remat = expand_schedule(cfg.remat, cfg.num_layers)[-1]  # the last layer's policy
    h = block_class(remat)(cfg, cfg.mtp.attention_type, cfg.mtp.mlp_type, name="block")(
        expand_streams(x_BxTxD, cfg.hc.streams), positions_BxT, segment_ids_BxT, ids_BxT, 0)
    return norm("final_norm")(collapse_streams(cfg, h))
