"""Loop hooks: host-side code that :func:`moejax.train.train` calls around every step.

A hook sees the host batch before the step (and may replace it) and the
step's metrics after it (once the non-finite policy has run). The defaults,
:func:`default_hooks`, are the MoE expert-collapse watch and the test-only
NaN injection; ``train(..., hooks=[...])`` takes others.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import jax
import ml_collections
import numpy as np

from moejax.layers.moe import EXPERT_LOAD_METRIC

log = logging.getLogger(__name__)


class LoopHook(Protocol):
  """What the train loop calls; both methods run on the host, outside ``jit``."""

  def before_step(self, step: int, batch: dict) -> dict:
    """The batch to train ``step`` on (``batch`` itself to leave it alone)."""

  def after_step(self, step: int, metrics: dict) -> None:
    """Sees the metrics of ``step`` (device arrays)."""


class ExpertCollapseWatch:
  """Warns when an MoE expert receives almost no tokens for many steps in a row.

  Reads the per-layer ``.../expert_load`` metrics (assignments per expert /
  mean, see ``moejax/layers/moe.py``); an expert below ``THRESHOLD`` for
  ``patience`` consecutive steps is reported once (again if it recovers and
  collapses anew); experts of one layer that collapse at the same step share
  one line. ``patience`` is ``model.moe.collapse_steps`` (0: never).
  """

  THRESHOLD = 0.01

  def __init__(self, patience: int):
    self.patience = patience
    self.streaks: dict[str, np.ndarray] = {}

  def before_step(self, step: int, batch: dict) -> dict:
    return batch

  def after_step(self, step: int, metrics: dict) -> None:
    self.update(step, metrics)

  def update(self, step: int, metrics: dict) -> list[str]:
    """Counts this step's loads; logs and returns the new warnings."""
    loads = {k: v for k, v in metrics.items() if k.endswith("/" + EXPERT_LOAD_METRIC)} if self.patience else {}
    warnings = []
    for name, load in jax.device_get(loads).items():
      streak = np.where(np.asarray(load) < self.THRESHOLD, self.streaks.get(name, 0) + 1, 0)
      self.streaks[name] = streak
      experts = np.flatnonzero(streak == self.patience).tolist()
      if experts:  # one line per layer and event, naming every expert that collapsed at this step
        warnings.append(
            f"step {step}: {name.rsplit('/', 1)[0]} experts {experts} ({len(experts)} of {streak.size}) have "
            f"received under {self.THRESHOLD:.0%} of the mean load for {self.patience} steps in a row (collapsed). "
            "Balance the router: model.moe.score_bias=True (aux-loss-free bias) or a larger bias_update_rate / "
            "load_balance_weight.")
    for message in warnings:
      log.warning(message)
    return warnings


# Fault injection for the reliability tests: steps whose batch gets NaN weights.
INJECT_NAN_ENV = "MOEJAX_INJECT_NAN_STEPS"


class InjectNaN:
  """Test-only: gives the batches of ``steps`` NaN weights (``MOEJAX_INJECT_NAN_STEPS=3,4``)."""

  def __init__(self, steps: frozenset[int]):
    self.steps = steps

  @classmethod
  def from_env(cls) -> InjectNaN:
    return cls(frozenset(int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s.strip()))

  def before_step(self, step: int, batch: dict) -> dict:
    return dict(batch, weights=np.full_like(batch["weights"], np.nan)) if step in self.steps else batch

  def after_step(self, step: int, metrics: dict) -> None:
    pass


class Profile:
  """A ``jax.profiler`` trace of steps ``start..stop`` (``train.profile_steps``) into ``directory``,
  viewable in TensorBoard's profile plugin / XProf (docs/profiling.md). Other steps run untraced."""

  def __init__(self, start: int, stop: int, directory: str):
    self.start, self.stop, self.directory, self.active = start, stop, directory, False

  def before_step(self, step: int, batch: dict) -> dict:
    if step == self.start:
      jax.profiler.start_trace(self.directory)
      self.active = True
    return batch

  def after_step(self, step: int, metrics: dict) -> None:
    if self.active and step >= self.stop:
      self.close(metrics)

  def close(self, metrics=None) -> None:
    """Ends the trace (after the traced step's work is done); the loop calls it if the run ends early."""
    if self.active:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      self.active = False
      log.info("wrote a profile of steps %d-%d to %s", self.start, self.stop, self.directory)


def default_hooks(cfg: ml_collections.ConfigDict) -> list[LoopHook]:
  """The hooks every run gets: NaN injection (empty unless its variable is set) and the collapse watch."""
  return [InjectNaN.from_env(), ExpertCollapseWatch(cfg.model.moe.collapse_steps)]
