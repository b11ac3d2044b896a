"""The optimizer and schedule registries, with the built-in optax entries."""

from __future__ import annotations

import jax
import ml_collections
import optax

from moejax.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


def weight_decay_mask(params):
  """Decay matrices only: norms, biases and other 1-D leaves are exempt."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


@SCHEDULES.register("constant")
def constant(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then the peak rate."""
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
       optax.constant_schedule(o.learning_rate)], [o.warmup_steps])


@SCHEDULES.register("cosine")
def cosine(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then cosine decay to ``min_lr_ratio * peak`` at the last step."""
  return optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, o.warmup_steps, max(total_steps, o.warmup_steps + 1),
      end_value=o.learning_rate * o.min_lr_ratio)


@SCHEDULES.register("wsd")
def wsd(o: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Warmup-stable-decay (Hu et al., 2024, MiniCPM): linear decay over the last
  ``decay_fraction`` of the steps down to ``min_lr_ratio * peak``."""
  decay = max(int(round(total_steps * o.decay_fraction)), 1)
  stable_end = max(total_steps - decay, o.warmup_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1)),
       optax.constant_schedule(o.learning_rate),
       optax.linear_schedule(o.learning_rate, o.learning_rate * o.min_lr_ratio, decay)],
      [o.warmup_steps, stable_end])


@OPTIMIZERS.register("adamw")
def adamw(o: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=weight_decay_mask)


@OPTIMIZERS.register("lion")
def lion(o: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  return optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=weight_decay_mask)


@OPTIMIZERS.register("sgd")
def sgd(o: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum ``b1`` and decoupled weight decay."""
  return optax.chain(optax.add_decayed_weights(o.weight_decay, weight_decay_mask),
                     optax.sgd(lr, momentum=o.b1, nesterov=True))


def build_optimizer(o: ml_collections.ConfigDict, total_steps: int):
  """(optax transformation with clipping, the schedule) for ``config.optim``.

  Warm-up is capped at ``total_steps``, so short smoke runs stay valid.
  """
  o = ml_collections.ConfigDict(o.to_dict())
  o.warmup_steps = min(o.warmup_steps, total_steps)
  schedule = SCHEDULES.get(o.schedule)(o, total_steps)
  tx = OPTIMIZERS.get(o.name)(o, schedule)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx, schedule
