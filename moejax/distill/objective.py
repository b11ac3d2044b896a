"""The distillation objective, plugged into ``moejax.train``'s step as an ``ExtraObjective``.

``objective = alpha * CE(labels) + (1 - alpha) * T^2 * KL`` (Hinton et al.,
2015; multi-teacher as in DeepSeek-V4's specialist distillation), with

    KL = sum_{b,t} w_bt KL_bt / sum_{b,t} w_bt,
    KL_bt = KL(p_teacher(b) || p_student)   (distill.kl="forward";
            KL(p_student || p_teacher(b))    for "reverse")

over the *full* vocabulary (``moejax/losses.py:chunked_distill_kl``: logits
formed ``train.loss_chunk`` positions at a time, never ``[B, T, V]``), where
teacher(b) is the specialist of row b's domain and ``w`` the label weights.

Row layout (``moejax/distill/data.py``): domain k owns rows ``[s_k, s_k + r_k)``
of every micro-batch, so each teacher runs on its own rows only (static
slices: no wasted teacher compute, no gather). The teachers are ``extra``
arguments of the jitted step, not part of the train state: no gradient
(their outputs are constants of the objective), no optimizer state, never
checkpointed with the student. ``teacher_source="cohost"``: ``extra`` holds
each teacher's ``(params, model_state)`` and the teacher runs in the step;
``"cache"``: each row's teacher hidden state comes in the batch
(``teacher_x_BxTxD``, zero-padded to the widest teacher) and ``extra`` holds
each teacher's output matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.distill.data import DomainSlice
from moejax.losses import chunked_distill_kl

ROW_KEYS = ("inputs", "positions", "segment_ids")


def teacher_hidden(model: nn.Module, params, model_state, batch) -> tuple[jax.Array, jax.Array]:
  """A frozen teacher's (x_BxTxD final normed hidden, head_DxV) on ``batch``'s rows."""
  hidden = model.apply({"params": params, **model_state}, batch["inputs"], batch["positions"],
                       batch["segment_ids"], return_hidden=True)
  return hidden.x_BxTxD, hidden.head_DxV


class DistillObjective:
  """``(1 - alpha) * T^2 * KL`` on top of ``alpha * CE`` (see module docstring).

  ``teachers``: per domain (in ``slices`` order) its model (cohost) or its
  hidden width (cache). Sums per micro-batch: ``kl_sum``, per-domain
  ``ce_sum_K``/``kl_sum_K``/``weight_K`` and, for MoE students, each MoE
  layer's ``routing/<layer>`` ``[K, E]`` (assignments of each domain's tokens
  to each expert).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, slices: Sequence[DomainSlice], teachers: Sequence,
               cached: bool):
    dc = cfg.distill
    self.ce_weight = dc.alpha
    self.kl_weight = (1.0 - dc.alpha) * dc.temperature ** 2
    self.temperature, self.reverse, self.cached = dc.temperature, dc.kl == "reverse", cached
    self.slices, self.teachers = tuple(slices), tuple(teachers)
    self.loss_chunk, self.num_experts = cfg.train.loss_chunk, cfg.model.moe.num_experts
    self.capture_experts = True

  def teacher(self, extra, k: int, rows) -> tuple[jax.Array, jax.Array]:
    """Domain k's teacher (x_BxTxD, head_DxV) on ``rows`` (its rows of a micro-batch)."""
    if self.cached:
      return rows["teacher_x_BxTxD"][..., :self.teachers[k]], extra[k]
    params, model_state = extra[k]
    return teacher_hidden(self.teachers[k], params, model_state, rows)

  def kl_BxT(self, extra, micro, xs_BxTxD, head_s_DxV) -> jax.Array:
    """float32 [B, T]: each row's KL to its domain's teacher."""
    parts = []
    for s in self.slices:
      rows = {key: v[s.start:s.stop] for key, v in micro.items()}
      xt_BxTxD, head_t_DxV = self.teacher(extra, s.index, rows)
      parts.append(chunked_distill_kl(xs_BxTxD[s.start:s.stop], head_s_DxV, xt_BxTxD, head_t_DxV,
                                      self.temperature, self.reverse, self.loss_chunk))
    return jnp.concatenate(parts, axis=0)

  def term(self, extra, micro, out, total_weight):
    w_BxT = micro["weights"].astype(jnp.float32)
    kl_BxT = self.kl_BxT(extra, micro, out.hidden.x_BxTxD, out.hidden.head_DxV)
    kl_sum = jnp.sum(kl_BxT * w_BxT)
    per_domain = lambda a_BxT: jnp.stack([jnp.sum(a_BxT[s.start:s.stop]) for s in self.slices])
    valid_BxT = (micro["segment_ids"] > 0).astype(jnp.float32)
    routing = {}
    for layer, expert_BxTxK in out.experts.items():
      counts_BxTxE = jnp.sum(jax.nn.one_hot(expert_BxTxK, self.num_experts, dtype=jnp.float32), axis=2)
      counts_BxE = jnp.einsum("BTE,BT->BE", counts_BxTxE, valid_BxT)
      routing[f"routing/{layer}"] = jnp.stack([jnp.sum(counts_BxE[s.start:s.stop], 0) for s in self.slices])
    sums = {"kl_sum": kl_sum, "ce_sum_K": per_domain(out.ce_BxT * w_BxT), "kl_sum_K": per_domain(kl_BxT * w_BxT),
            "weight_K": per_domain(w_BxT), **routing}
    return self.kl_weight * kl_sum / total_weight, sums

  def metrics(self, sums, total_weight, prefix: str = "train_"):
    """``kl``, ``extra_loss`` and per domain ``{prefix}ce_<d>``, ``{prefix}kl_<d>``, and
    ``<layer>/domain_<d>_experts`` [E] (the share of domain d's assignments per expert)."""
    kl = sums["kl_sum"] / total_weight
    weight_K = jnp.maximum(sums["weight_K"], 1.0)
    out = {"kl": kl, "extra_loss": self.kl_weight * kl}
    for s in self.slices:
      out[f"{prefix}ce_{s.name}"] = sums["ce_sum_K"][s.index] / weight_K[s.index]
      out[f"{prefix}kl_{s.name}"] = sums["kl_sum_K"][s.index] / weight_K[s.index]
    for key, counts_KxE in sums.items():
      if key.startswith("routing/"):
        share_KxE = counts_KxE / jnp.maximum(jnp.sum(counts_KxE, -1, keepdims=True), 1.0)
        out.update({f"{key[len('routing/'):]}/domain_{s.name}_experts": share_KxE[s.index] for s in self.slices})
    return out
