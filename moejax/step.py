"""The pure, jitted steps: ``train_step(state, batch) -> (state, metrics)`` and ``eval_step``.

A train step composes the pieces of the other modules: the batch's MTP
targets (once), :func:`moejax.grad_accum.microbatched` around the gradient of
:meth:`moejax.objective.Objective.micro_loss`, the optimizer update (which
gets the per-head max logits for QK-clip), the model-state update, the
non-finite guard and the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moejax.grad_accum import first_micro, microbatched
from moejax.layers.state import update_model_state
from moejax.models.scan import plan_of, stack_collections, unstack, unstack_collections
from moejax.objective import Batch, ExtraObjective, Losses, Objective, forward, with_mtp_targets
from moejax.optim import optimizer_metrics
from moejax.tree_paths import flatten, layer_name


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-trainable variable collections (empty for dense models)
  nonfinite_steps: jax.Array  # updates skipped because the loss or a gradient was NaN/Inf


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int, loss_chunk: int, extra_objective: ExtraObjective | None = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """The pure train step; gradients accumulate over ``grad_accum_steps``.

  The objective is the token-weighted mean cross-entropy over the *whole*
  batch, plus the mean of the sown auxiliary losses, plus (with
  ``model.mtp.depth = L > 0``) ``loss_weight / L * sum_k`` of each MTP
  depth's weighted mean cross-entropy, so accumulation gives the same update
  as one big batch. The ``loss`` metric is the main next-token CE alone;
  ``mtp_loss_k`` are logged per depth. An ``extra_objective`` scales the CE
  by its ``ce_weight`` and adds its term (``train_step(state, batch, extra)``).
  """
  objective = Objective(model.cfg.mtp, grad_accum_steps, extra_objective)
  capture = extra_objective is not None and extra_objective.capture_experts

  def train_step(state: TrainState, batch: Batch, extra=None):
    batch = with_mtp_targets(batch, objective.depth)
    norm = objective.normalizers(batch)

    def micro_loss(params, micro: Batch):
      out = forward(model, params, state.model_state, micro, loss_chunk, capture)
      return objective.micro_loss(out, micro, norm, extra)

    def micro_grads(micro: Batch):
      (_, (sums, max_logits)), grads = jax.value_and_grad(micro_loss, has_aux=True)(state.params, micro)
      return (grads, sums), max_logits

    (grads, (ce_sum, mtp_sum_L, aux_sum, stats, layer_metrics, extra_sums)), max_logits = microbatched(
        micro_grads, grad_accum_steps)(batch)
    losses = objective.losses(ce_sum, mtp_sum_L, aux_sum, extra_sums, norm)

    def objective_fn(params):
      """~The first micro-batch's mean objective (Sophia's Hessian-vector products)."""
      return grad_accum_steps * micro_loss(params, first_micro(batch, grad_accum_steps))[0]

    updates, opt_state = tx.update(grads, state.opt_state, state.params, max_logits=max_logits, obj_fn=objective_fn)
    params = optax.apply_updates(state.params, updates)
    plan = plan_of(model.cfg)  # model.scan_layers: updates see per-layer trees (moejax/models/scan.py)
    model_state = stack_collections(update_model_state(
        unstack_collections(state.model_state, plan), stats, model.cfg, state.step), plan)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(losses.total) & jnp.isfinite(grad_norm)
    params, opt_state, model_state = keep_if_finite(
        finite, (params, opt_state, model_state), (state.params, state.opt_state, state.model_state))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state,
                              nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
    metrics = step_metrics(losses, grad_norm, finite, new_state, unstack(updates, plan), max_logits,
                           {k: v / grad_accum_steps for k, v in layer_metrics.items()})
    return new_state, {**metrics, "learning_rate": schedule(state.step), "tokens": norm.total_weight}

  return train_step


def keep_if_finite(finite: jax.Array, new, old):
  """``new`` where ``finite``, else ``old``: a NaN/Inf loss or gradient leaves the state exactly as it
  was (the trainer's ``config.train.nonfinite`` policy decides what happens next)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def step_metrics(losses: Losses, grad_norm, finite, state: TrainState, updates, max_logits: dict,
                 layer_metrics: dict) -> dict[str, jax.Array]:
  """The logged metrics of one step (``state`` is the state after it)."""
  return {"loss": losses.ce, "aux_loss": losses.aux, "total_loss": losses.total, "grad_norm": grad_norm,
          "param_norm": optax.tree.norm(state.params), "finite": finite, "nonfinite_steps": state.nonfinite_steps,
          **{f"mtp_loss_{k + 1}": losses.mtp_loss_L[k] for k in range(losses.mtp_loss_L.shape[0])},
          **losses.extra_metrics, **layer_metrics, **_per_layer_rms(updates), **optimizer_metrics(state.opt_state),
          **{f"{module}/max_logit": jnp.max(m_H) for module, m_H in max_logits.items()}}


def _per_layer_rms(updates) -> dict[str, jax.Array]:
  """{"layer_0/update_rms": RMS of the parameter change over that top-level module} (``updates`` in the
  unrolled layout: the train step unstacks scanned layers' slices, which XLA fuses into the reductions)."""
  sums: dict[str, list] = {}
  for path, u in flatten(updates).items():
    entry = sums.setdefault(f"{layer_name(path)}/update_rms", [0.0, 0])
    entry[0] = entry[0] + jnp.sum(jnp.square(u.astype(jnp.float32)))
    entry[1] += u.size
  return {k: jnp.sqrt(total / float(count)) for k, (total, count) in sums.items()}  # counts can pass 2^31


def make_eval_step(model: nn.Module, loss_chunk: int) -> Callable[[Any, Any, Batch], dict]:
  """Sums of weighted loss, weight and correct argmax predictions on a batch,
  and per MTP depth (``[L]`` arrays) of weighted loss and weight."""

  def eval_step(params, model_state, batch: Batch):
    out = forward(model, params, model_state, batch, loss_chunk)
    w_BxT = batch["weights"].astype(jnp.float32)
    return {"loss_sum": jnp.sum(out.ce_BxT * w_BxT), "weight_sum": jnp.sum(w_BxT),
            "correct_sum": jnp.sum(out.correct_BxT * w_BxT),
            "mtp_loss_sum": jnp.sum(out.mtp_ce_BxLxT * out.mtp_weights_BxLxT, axis=(0, 2)),
            "mtp_weight_sum": jnp.sum(out.mtp_weights_BxLxT, axis=(0, 2))}

  return eval_step
