"""The optimizer and schedule registries, with the built-in optax entries.

An optimizer entry is ``OPTIMIZERS[name](optim_cfg, schedule, layout) ->
optax.GradientTransformation``; ``layout`` (a :class:`ParamLayout` or None)
tells optimizers that care (Muon, QK-clip) each parameter's logical axis
names and mesh PartitionSpec, matched by path.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_collections
import optax

from moejax.optim.qk_clip import qk_clip
from moejax.registry import Registry

# Capabilities (``register`` keywords): ``section``, the name of the optimizer's own options
# ``optim.<section>``; ``defaults() -> ConfigDict``, that section's fields and defaults;
# ``validate_config(cfg) -> list[str]``, their checks (run when the optimizer is selected or
# its section is present). :func:`use_optimizer` adds the section to a config.
OPTIMIZERS = Registry("optimizer", capabilities=dict(section=None, defaults=None))
SCHEDULES = Registry("schedule")


class ParamLayout(NamedTuple):
  """Per-parameter metadata, as trees shaped like the params (or {path: value})."""

  logical_axes: Any  # e.g. nn.get_partition_spec(boxed_params): P('embed', 'heads', 'head_dim')
  mesh_axes: Any     # the parameters' mesh PartitionSpecs, e.g. P('fsdp', 'tensor', None)


def weight_decay_mask(params):
  """Decay matrices only: norms, biases and other 1-D leaves are exempt (under ``model.scan_layers`` a
  scanned layer's leaves carry one more, leading, axis: ``moejax/models/scan.py``)."""
  from moejax.models.scan import SCANNED
  from moejax.tree_paths import path_str

  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim - (path_str(path).split("/")[0] == SCANNED) >= 2, params)


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
def adamw(o: ml_collections.ConfigDict, lr: optax.Schedule, layout=None) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=weight_decay_mask)


@OPTIMIZERS.register("lion")
def lion(o: ml_collections.ConfigDict, lr: optax.Schedule, layout=None) -> optax.GradientTransformation:
  return optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=weight_decay_mask)


@OPTIMIZERS.register("sgd")
def sgd(o: ml_collections.ConfigDict, lr: optax.Schedule, layout=None) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum ``b1`` and decoupled weight decay."""
  return optax.chain(optax.add_decayed_weights(o.weight_decay, weight_decay_mask),
                     optax.sgd(lr, momentum=o.b1, nesterov=True))


@OPTIMIZERS.register("adafactor")
def adafactor(o: ml_collections.ConfigDict, lr: optax.Schedule, layout=None) -> optax.GradientTransformation:
  """Adafactor (Shazeer & Stern, 2018): factored second moment (decay 0.8, the
  paper's), update clipped to block RMS 1, momentum ``b1``, then decoupled
  weight decay and the learning rate as in AdamW (no parameter-scale step)."""
  return optax.chain(optax.scale_by_factored_rms(decay_rate=0.8), optax.clip_by_block_rms(1.0),
                     optax.ema(o.b1, debias=False), optax.add_decayed_weights(o.weight_decay, weight_decay_mask),
                     optax.scale_by_learning_rate(lr))


@OPTIMIZERS.register("sophia")
def sophia(o: ml_collections.ConfigDict, lr: optax.Schedule, layout=None) -> optax.GradientTransformation:
  """Sophia-H (Liu et al., 2023), optax.contrib's: a diagonal-Hessian (second-order)
  preconditioner from Hutchinson's estimator every 10 steps (needs the extra
  argument ``obj_fn``, which the trainer passes), momentum ``b1``, Hessian EMA
  0.99, gamma 0.01, per-coordinate clip 1; decoupled weight decay."""
  return optax.contrib.sophia(lr, b1=o.b1, b2=0.99, weight_decay=o.weight_decay,
                              weight_decay_mask=weight_decay_mask)


def use_optimizer(cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Selects optimizer ``name`` (``cfg.optim.name``) and adds its options section with defaults
  if the config lacks it; call it in ``get_config`` before the config is locked. Returns ``cfg``."""
  cfg.optim.name = name
  section, defaults = OPTIMIZERS.capability(name, "section"), OPTIMIZERS.capability(name, "defaults")
  if section and section not in cfg.optim:
    cfg.optim[section] = defaults() if defaults else ml_collections.ConfigDict()
  return cfg


def build_optimizer(o: ml_collections.ConfigDict, total_steps: int, layout: ParamLayout | None = None):
  """(optax transformation with clipping and QK-clip, the schedule) for ``config.optim``.

  Warm-up is capped at ``total_steps``, so short smoke runs stay valid. The
  transformation accepts the extra ``update`` arguments ``max_logits``
  (QK-clip) and ``obj_fn`` (Sophia); others ignore them.
  """
  o = ml_collections.ConfigDict(o.to_dict())
  o.warmup_steps = min(o.warmup_steps, total_steps)
  schedule = SCHEDULES.get(o.schedule)(o, total_steps)
  tx = OPTIMIZERS.get(o.name)(o, schedule, layout)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  if o.qk_clip_tau > 0:
    tx = optax.chain(tx, qk_clip(o.qk_clip_tau, layout and layout.logical_axes, tuple(o.qk_clip_params)))
  return optax.with_extra_args_support(tx), schedule
