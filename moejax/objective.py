"""The training objective: one forward pass and the loss terms built from it.

:func:`forward` runs the model once and returns per-token cross-entropies
plus what the layers sowed (see ``docs/architecture.md`` for that contract).
:class:`Objective` turns one micro-batch's :class:`Forward` into its share of
the batch objective, CE + aux + MTP + an optional :class:`ExtraObjective`,
and the summed parts back into logged losses.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers.routers import replay_variables
from moejax.losses import chunked_token_stats
from moejax.models import Hidden
from moejax.models.mtp import mtp_targets
from moejax.models.scan import plan_of, stack_collections, unstack_collections
from moejax.tree_paths import flatten

Batch = dict[str, jax.Array]

# Sown collections: aux_loss (added to the loss), stats (summed over micro-batches, for
# moejax/layers/state.py), metrics (logged), max_stats (maxed over micro-batches; attention's
# "max_logit" [H] feeds QK-clip and is logged per layer).
SOWN = ("aux_loss", "stats", "metrics", "max_stats")

# Batch keys added by with_mtp_targets (the depth-k targets and weights of the whole batch).
MTP_TARGETS, MTP_WEIGHTS = "mtp_targets", "mtp_weights"


class Forward(NamedTuple):
  """One forward pass: per-token results and what the layers sowed."""

  ce_BxT: jax.Array       # float32 cross-entropy of each target
  correct_BxT: jax.Array  # float32 1.0 where the argmax is the target
  mtp_ce_BxLxT: jax.Array       # float32 cross-entropy of each MTP depth's target (L = model.mtp.depth)
  mtp_weights_BxLxT: jax.Array  # their weights (0 past the row / across documents; see models/mtp.py)
  aux_loss: jax.Array     # sum of the sown auxiliary losses
  stats: dict             # for model-state updates (see moejax/layers/state.py)
  metrics: dict           # scalars to log, named by module path
  max_logits: dict        # {"layer_0/attention": float32 [H]} per-head max attention logit
  hidden: Hidden          # final normed hidden states and output matrix (for distillation)
  experts: dict           # {"layer_1/mlp": int32 [B, T, A]} routed experts (only with capture_experts)


def with_mtp_targets(batch: Batch, depth: int) -> Batch:
  """``batch`` plus its MTP targets and weights ``[B, L, T]`` (L = ``depth``; see ``mtp_targets``).

  The train step adds them once for the whole batch; micro-batches split them
  with the other rows. A batch that already has them is returned as it is.
  """
  if MTP_TARGETS in batch:
    return batch
  y_BxLxT, w_BxLxT = mtp_targets(batch["targets"], batch["weights"], batch["segment_ids"], depth)
  return {**batch, MTP_TARGETS: y_BxLxT, MTP_WEIGHTS: w_BxLxT}


def forward(model: nn.Module, params, model_state, batch: Batch, loss_chunk: int,
            capture_experts: bool = False) -> Forward:
  """Runs the model; logits are formed ``loss_chunk`` positions at a time.

  ``capture_experts`` also returns each MoE layer's routed experts (the
  output of every module named ``router``).
  """
  capture = (lambda module, _: module.name == "router") if capture_experts else False
  plan = plan_of(model.cfg)  # model.scan_layers: what the scanned layers sow is stacked; give it per layer
  replay = stack_collections(replay_variables(batch), plan)
  hidden, sown = model.apply(
      {"params": params, **model_state, **replay}, batch["inputs"], batch["positions"], batch["segment_ids"],
      return_hidden=True, mutable=list(SOWN), capture_intermediates=capture)
  sown = unstack_collections(sown, plan)
  ce_BxT, correct_BxT = chunked_token_stats(hidden.x_BxTxD, hidden.head_DxV, batch["targets"], loss_chunk)
  batch = with_mtp_targets(batch, len(hidden.mtp))
  mtp_y_BxLxT, mtp_w_BxLxT = batch[MTP_TARGETS], batch[MTP_WEIGHTS]
  mtp_ce = [chunked_token_stats(h_BxTxD, hidden.head_DxV, mtp_y_BxLxT[:, k], loss_chunk)[0]
            for k, h_BxTxD in enumerate(hidden.mtp)]
  mtp_ce_BxLxT = jnp.stack(mtp_ce, axis=1) if mtp_ce else jnp.zeros_like(mtp_w_BxLxT)
  aux = sum((jnp.sum(x) for x in jax.tree.leaves(sown.get("aux_loss", {}))), jnp.zeros((), jnp.float32))
  return Forward(ce_BxT, correct_BxT, mtp_ce_BxLxT, mtp_w_BxLxT, aux, dict(sown.get("stats", {})),
                 _flat_metrics(sown.get("metrics", {})), _module_maxima(sown.get("max_stats", {})), hidden,
                 routed_experts(sown.get("intermediates", {}), batch["inputs"].shape))


def routed_experts(tree, shape_BxT) -> dict[str, jax.Array]:
  """{"layer_1/mlp": expert_BxTxA} from captured router outputs ``(expert_NxA, weight_NxA, aux)``."""
  experts = {}
  for path, leaf in flatten(tree, is_leaf=lambda x: isinstance(x, tuple)).items():
    experts[path.split("/router/", 1)[0]] = leaf[0][0].reshape(*shape_BxT, -1)
  return experts


def _flat_metrics(tree) -> dict[str, jax.Array]:
  """{"layer_1/mlp/load_max_over_mean": scalar, ...} from a sown ``metrics`` tree.

  Vectors stay vectors (e.g. ``layer_1/mlp/expert_load`` [E]); anything else is averaged.
  """
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))  # no sow index
    leaf = leaf.astype(jnp.float32)
    flat[name] = leaf if leaf.ndim == 1 else jnp.mean(leaf)
  return flat


def _module_maxima(tree) -> dict[str, jax.Array]:
  """{"layer_0/attention": max_H} from sown ``max_stats`` (max over repeated sows)."""
  maxima: dict[str, jax.Array] = {}
  for path, leaf in flatten(tree).items():
    module = path.rsplit("/", 2)[0]  # drop "max_logit/<sow index>"
    leaf = leaf.astype(jnp.float32)
    maxima[module] = jnp.maximum(maxima[module], leaf) if module in maxima else leaf
  return maxima


class ExtraObjective(Protocol):
  """A term added to the language-modelling objective (e.g. distillation, ``moejax/distill``).

  ``train_step(state, batch, extra)`` passes ``extra`` (arrays the term needs
  but does not train, e.g. frozen teacher parameters) to :meth:`term` for each
  micro-batch; the term's ``sums`` are added over micro-batches and turned
  into logged metrics by :meth:`metrics`.
  """

  ce_weight: float        # weight of the token cross-entropy in the objective (plain training: 1)
  capture_experts: bool   # whether term() reads ``out.experts`` (MoE routing)

  def term(self, extra, micro: Batch, out: Forward, total_weight: jax.Array) -> tuple[jax.Array, dict]:
    """(objective term of this micro-batch, already divided by the batch's ``total_weight``; sums)."""

  def metrics(self, sums: dict, total_weight: jax.Array) -> dict:
    """Logged metrics from the sums over the whole batch; ``extra_loss`` (the term over the
    whole batch) is added to ``total_loss``."""


class Normalizers(NamedTuple):
  """Token weights of the whole batch: each micro-batch's sums are divided by them."""

  total_weight: jax.Array         # scalar, >= 1
  mtp_total_weight_L: jax.Array   # [L] per MTP depth, >= 1


class Losses(NamedTuple):
  """The batch objective's parts (scalars; ``mtp_loss_L`` per MTP depth)."""

  ce: jax.Array
  aux: jax.Array
  mtp_loss_L: jax.Array
  extra_metrics: dict
  total: jax.Array


class Objective:
  """``ce_weight * CE + aux + loss_weight / L * sum_k MTP_k + extra``, each a weighted mean over the
  *whole* batch, so that summing :meth:`micro_loss` over micro-batches gives the one-batch objective.

  ``micro_loss`` returns ``(objective, (sums, max_logits))``: ``sums`` are added
  over micro-batches, ``max_logits`` maxed, and :meth:`losses` turns them into
  the batch's losses.
  """

  def __init__(self, mtp: ml_collections.ConfigDict, grad_accum_steps: int, extra: ExtraObjective | None):
    self.depth, self.mtp_weight = mtp.depth, mtp.loss_weight
    self.grad_accum_steps = grad_accum_steps
    self.extra = extra
    self.ce_weight = 1.0 if extra is None else extra.ce_weight

  def normalizers(self, batch: Batch) -> Normalizers:
    """From a batch that went through :func:`with_mtp_targets`."""
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
    return Normalizers(total_weight, jnp.maximum(jnp.sum(batch[MTP_WEIGHTS], axis=(0, 2)), 1.0))

  def micro_loss(self, out: Forward, micro: Batch, norm: Normalizers, extra_inputs):
    ce_sum = jnp.sum(out.ce_BxT * micro["weights"].astype(jnp.float32))
    mtp_sum_L = jnp.sum(out.mtp_ce_BxLxT * out.mtp_weights_BxLxT, axis=(0, 2))
    mtp_term = self.mtp_weight / max(self.depth, 1) * jnp.sum(mtp_sum_L / norm.mtp_total_weight_L)
    extra_term, extra_sums = (jnp.zeros((), jnp.float32), {}) if self.extra is None else (
        self.extra.term(extra_inputs, micro, out, norm.total_weight))
    objective = (self.ce_weight * ce_sum / norm.total_weight + out.aux_loss / self.grad_accum_steps + mtp_term
                 + extra_term)
    return objective, ((ce_sum, mtp_sum_L, out.aux_loss, out.stats, out.metrics, extra_sums), out.max_logits)

  def losses(self, ce_sum, mtp_sum_L, aux_sum, extra_sums, norm: Normalizers) -> Losses:
    """The batch's losses from the micro-batch sums."""
    ce = ce_sum / norm.total_weight
    aux = aux_sum / self.grad_accum_steps
    mtp_loss_L = mtp_sum_L / norm.mtp_total_weight_L
    extra_metrics = {} if self.extra is None else self.extra.metrics(extra_sums, norm.total_weight)
    total = (self.ce_weight * ce + aux + self.mtp_weight / max(self.depth, 1) * jnp.sum(mtp_loss_L)
             + extra_metrics.get("extra_loss", 0.0))
    return Losses(ce, aux, mtp_loss_L, extra_metrics, total)
