"""Lightning indexer (DeepSeek-V3.2 DSA, arXiv:2512.02556; DeepSeek-V4 CSA) and its training.

Score of query t for key (or compressed entry) s, with J indexer heads of
width I: ``I[t, s] = sum_j w[t, j] * relu(q[t, j] . k[s])`` where ``q = q_resid
W_qb`` (from the main attention's low-rank query), ``w = x W_w * J^-0.5 *
I^-0.5`` and one key per token/entry. Each query keeps the ``index_topk``
best causally visible keys; the main attention runs over those only.

Training (``attention.indexer_stage``):

* ``warmup`` — the main attention stays dense; the indexer learns to match
  it: ``KL(p_t || softmax(I[t, :]))`` over all visible keys, where ``p_t`` is
  the main attention probability summed over heads and L1-normalised;
* ``sparse`` — the main attention runs over the selected keys; the KL is
  restricted to them;
* ``off`` — sparse attention, no loss (inference, or a frozen indexer).

In both training stages the indexer's inputs are detached
(``stop_gradient``) and so is the target, so the KL trains the indexer only
and the LM loss never reaches the indexer (top-k is not differentiable).
The KL (mean over query tokens, times ``indexer_loss_weight``) is sown into
``aux_loss``; the KL and the recall (share of the dense attention mass
inside the selected top-k, on ``indexer_recall_queries`` query rows) into
``metrics``. To freeze everything but the indexer during warm-up, mask the
optimizer to parameters whose path contains ``indexer`` (optax.masked).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from moejax.layers.attention import core, options
from moejax.layers.rope import Rope, apply_rope


def check_rope(a, attention_type: str, rope_channels: int) -> list[str]:
  """The config check of an indexer that rotates ``rope_channels`` of its ``index_head_dim`` channels."""
  if rope_channels <= a.index_head_dim and rope_channels % 2 == 0:
    return []
  return [f"model.attention.index_head_dim={a.index_head_dim} is smaller than the {rope_channels} rope channels "
          f"the {attention_type} indexer rotates; raise index_head_dim."]



def indexer_queries(module: nn.Module, x_BxTxD, q_resid_BxTxRq, positions_BxT, rope: Rope):
  """(q_BxTxJxI rotated, w_BxTxJ float32 head weights incl. ``J^-0.5 I^-0.5``).

  Creates, on ``module`` (call from its compact ``__call__``), ``w_q_b [Rq, J, I]``
  (HF wq_b / q_b_proj) and ``w_weights [D, J]`` (weights_proj).
  """
  a = module.cfg.attention
  j, i = a.index_heads, a.index_head_dim
  w_q_b = options.weight(module, "w_q_b", (a.q_lora_rank, j, i), ("lora", "index_heads", "head_dim"))
  w_weights = options.weight(module, "w_weights", (module.cfg.d_model, j), ("embed", "index_heads"))
  q_BxTxJxI = apply_rope(jnp.einsum("BTR,RJI->BTJI", q_resid_BxTxRq.astype(w_q_b.dtype), w_q_b),
                         positions_BxT, rope)
  w_BxTxJ = jnp.einsum("BTD,DJ->BTJ", x_BxTxD.astype(w_weights.dtype), w_weights).astype(jnp.float32)
  return q_BxTxJxI, w_BxTxJ * (j ** -0.5 * i ** -0.5)


class TokenIndexer(nn.Module):
  """DeepSeek-V3.2's indexer over tokens: (x, q_resid, positions) -> (q_BxTxJxI, w_BxTxJ, k_BxTxI).

  Keys ``k = layernorm(x W_k)`` (one per token, shared by the J heads), with
  rope on the leading ``qk_rope_head_dim`` channels in the rotate-half layout
  (unlike V3.2's MLA, which interleaves). Parameters -> HF ``indexer.*``:
  ``w_k`` = wk.T, ``k_norm`` = k_norm (LayerNorm with bias), plus
  :func:`indexer_queries`' ``w_q_b``, ``w_weights``.
  """

  cfg: ml_collections.FrozenConfigDict
  rope: Rope

  @nn.compact
  def __call__(self, x_BxTxD, q_resid_BxTxRq, positions_BxT):
    q_BxTxJxI, w_BxTxJ = indexer_queries(self, x_BxTxD, q_resid_BxTxRq, positions_BxT, self.rope)
    w_k = options.weight(self, "w_k", (self.cfg.d_model, self.cfg.attention.index_head_dim), ("embed", "head_dim"))
    dtype, pdtype = options.dtypes(self.cfg)
    k_BxTxI = nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=pdtype, name="k_norm")(
        jnp.einsum("BTD,DI->BTI", x_BxTxD.astype(w_k.dtype), w_k))
    return q_BxTxJxI, w_BxTxJ, apply_rope(k_BxTxI, positions_BxT, self.rope)


def scores(q_BxQxJxI, w_BxQxJ, k_BxSxI):
  """``sum_j w_j relu(q_j . k_s)``, float32 [B, Q, S], one head at a time ([B, Q, S] memory)."""

  def head(acc, xs):
    q_BxQxI, w_BxQ = xs
    s = jnp.einsum("BQI,BSI->BQS", q_BxQxI, k_BxSxI, preferred_element_type=jnp.float32)
    return acc + w_BxQ[..., None] * jax.nn.relu(s), None

  init = jnp.zeros(q_BxQxJxI.shape[:2] + k_BxSxI.shape[1:2], jnp.float32)
  out, _ = jax.lax.scan(head, init, (jnp.moveaxis(q_BxQxJxI, 2, 0), jnp.moveaxis(w_BxQxJ, 2, 0)))
  return out


def gathered_scores(q_BxQxJxI, w_BxQxJ, k_BxQxSxI):
  """Scores against per-query key lists, float32 [B, Q, S]."""
  s = jnp.einsum("BQJI,BQSI->BQJS", q_BxQxJxI, k_BxQxSxI, preferred_element_type=jnp.float32)
  return jnp.einsum("BQJ,BQJS->BQS", w_BxQxJ, jax.nn.relu(s))


def top_k(scores_BxQxS, valid_BxQxS, k: int):
  """The k best valid keys per query: (index_BxQxk, ok_BxQxk); ``ok`` is False where fewer exist.

  Ties go to the lower key index (``lax.top_k``). Tagged "selection" so that
  rematerialised query chunks keep it (``core.map_query_chunks``).
  """
  _, idx = jax.lax.top_k(jnp.where(valid_BxQxS, scores_BxQxS, core.NEG), k)
  ok = jnp.take_along_axis(valid_BxQxS, idx, axis=-1)
  return checkpoint_name(idx, "selection"), checkpoint_name(ok, "selection")


def gather(x_BxSx_, idx_BxQxk):
  """x[b, idx[b, q, k]] -> [B, Q, k, ...]."""
  return jax.vmap(lambda x, i: x[i])(x_BxSx_, idx_BxQxk)


def kl_to_main(logits_BxQxHxS, lse_BxQxH, index_BxQxS, valid_BxQxS, query_ok_BxQ):
  """Summed ``KL(p || softmax(index))`` over queries, and the number of queries counted.

  ``p`` = the main attention probabilities ``exp(logits - lse)`` (``lse`` of the
  whole main softmax) on the valid keys, summed over heads and L1-normalised;
  the target carries no gradient. Queries with no valid key are skipped.
  """
  p_h = jnp.where(valid_BxQxS[:, :, None], jnp.exp(jax.lax.stop_gradient(
      logits_BxQxHxS.astype(jnp.float32) - lse_BxQxH[..., None])), 0.0)
  p = p_h.sum(2)
  mass = p.sum(-1)
  p = p / jnp.where(mass > 0, mass, 1.0)[..., None]
  s = jnp.where(valid_BxQxS, index_BxQxS, core.NEG)
  log_q = s - jax.nn.logsumexp(s, axis=-1, keepdims=True)
  kl = jnp.sum(jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0), axis=-1)
  ok = query_ok_BxQ & (mass > 0)
  return {"kl_sum": jnp.sum(jnp.where(ok, kl, 0.0)), "kl_count": jnp.sum(ok.astype(jnp.float32))}


def recall(logits_BxRxHxS, valid_BxRxS, index_BxRxS, k: int, row_ok_BxR):
  """Mean share of the dense attention mass (head-averaged) inside the indexer's top-k."""
  logits_BxRxHxS, index_BxRxS = jax.lax.stop_gradient((logits_BxRxHxS, index_BxRxS))
  s = jnp.where(valid_BxRxS[:, :, None], logits_BxRxHxS.astype(jnp.float32), core.NEG)
  p = jnp.where(valid_BxRxS[:, :, None], jax.nn.softmax(s, axis=-1), 0.0).mean(2)
  idx, ok = top_k(index_BxRxS, valid_BxRxS, k)
  inside = jnp.sum(jnp.where(ok, jnp.take_along_axis(p, idx, axis=-1), 0.0), axis=-1)
  row_ok = row_ok_BxR & valid_BxRxS.any(-1)
  return jnp.sum(jnp.where(row_ok, inside, 0.0)) / jnp.maximum(jnp.sum(row_ok), 1)


def recall_rows(seq_len: int, count: int) -> np.ndarray:
  """``count`` query indices spread evenly over the sequence (static)."""
  return np.unique(np.linspace(0, seq_len - 1, min(count, seq_len)).round().astype(np.int32))


def sow_training(module: nn.Module, sums: dict, recall_value=None) -> None:
  """Sows the KL (``aux_loss`` x weight, ``metrics``) and the recall (``metrics``)."""
  a = module.cfg.attention
  if "kl_sum" in sums:
    kl = sums["kl_sum"] / jnp.maximum(sums["kl_count"], 1.0)
    module.sow("aux_loss", "indexer_kl", a.indexer_loss_weight * kl)
    module.sow("metrics", "indexer_kl", kl)
  if recall_value is not None:
    module.sow("metrics", "indexer_recall", recall_value)


def wants_recall(module: nn.Module) -> bool:
  return module.cfg.attention.indexer_recall_queries > 0 and module.is_mutable_collection("metrics")
