"""Aux-loss-free balancing: the bias update rate as a schedule, and where balance is measured.

``model.moe`` fields (DeepSeek-V3 §2.1.2, Wang et al. 2024):

* ``bias_update_rate`` — the base rate gamma;
* ``bias_update_schedule`` — ``constant``: gamma at every step; ``step``:
  gamma for steps ``< bias_update_steps``, then 0 (DeepSeek-V3: 0.001 for the
  first 14.3T tokens, 0 for the last 500B); ``linear``: gamma decays linearly
  to 0 at ``bias_update_steps``; ``cosine``: ``gamma (1 + cos(pi s / S)) / 2``
  up to ``S = bias_update_steps``, then 0;
* ``balance_stats`` — ``global``: each bias moves by ``sign(mean(load) - load)``
  of the loads summed over the whole (global) batch, all micro-batches and
  devices; ``micro``: by the mean over micro-batches of each micro-batch's
  sign (what a trainer that updates per micro-batch sees).

The update after 0-based step ``s``: ``b += rate(s) * sign_term``
(``moejax/layers/routers.py:update_router_bias``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

BIAS_SCHEDULES = ("constant", "step", "linear", "cosine")
BALANCE_STATS = ("global", "micro")


def bias_update_rate(moe, step):
  """The rate after 0-based step ``step`` (a jnp scalar under jit, or a Python int)."""
  gamma = moe.bias_update_rate
  kind, stop = moe.bias_update_schedule, moe.bias_update_steps
  if kind == "constant":
    return jnp.asarray(gamma, jnp.float32)
  s = jnp.asarray(step, jnp.float32)
  before = (s < stop).astype(jnp.float32)
  if kind == "step":
    return gamma * before
  frac = jnp.clip(s / max(stop, 1), 0.0, 1.0)
  if kind == "linear":
    return gamma * (1.0 - frac) * before
  return gamma * 0.5 * (1.0 + jnp.cos(math.pi * frac)) * before


def validate_balancing(moe, errors: list[str]) -> None:
  """Appends an error naming the field, value and fix for each invalid balancing field."""
  kind, stop = moe.bias_update_schedule, moe.bias_update_steps
  if kind not in BIAS_SCHEDULES:
    errors.append(f"model.moe.bias_update_schedule={kind!r} is not one of {BIAS_SCHEDULES}.")
  elif kind != "constant" and stop <= 0:
    errors.append(f"model.moe.bias_update_schedule={kind!r} needs model.moe.bias_update_steps > 0 (the step where "
                  f"the rate reaches 0), got {stop}.")
  if stop < 0:
    errors.append(f"model.moe.bias_update_steps={stop} must be >= 0.")
  if moe.balance_stats not in BALANCE_STATS:
    errors.append(f"model.moe.balance_stats={moe.balance_stats!r} is not one of {BALANCE_STATS}.")
