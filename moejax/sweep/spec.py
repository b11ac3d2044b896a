"""A sweep: arms (the compared methods), each with its own tuning grid, times seeds.

A sweep file is plain Python with ``get_sweep() -> Sweep``::

    from moejax.sweep import Arm, Sweep

    def get_sweep():
      return Sweep(
          arms={"adamw": Arm({"optim.name": "adamw"}, {"optim.learning_rate": [1e-3, 3e-3, 1e-2]}),
                "muon": Arm({"optim.name": "muon"}, {"optim.learning_rate": [3e-3, 1e-2, 3e-2]})},
          common={"train.steps": 300},
          seeds=(0, 1),
          baseline="adamw",
          budgets=(0.25, 0.5, 2.0))

Keys are dotted config fields (any field: ``optim.muon.coefficients``,
``model.d_model``, ...). Every arm must have the same number of trials (the
product of its grid's list lengths): equal tuning budget by construction.
``budgets``: extra runs of the baseline's best trial at these multiples of
``train.steps`` (for the loss-vs-tokens fit behind D_eff/D).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
from typing import Any

import ml_collections

from moejax import config as config_lib
from moejax.config_apply import apply_config
from moejax.validation import validate


@dataclasses.dataclass(frozen=True)
class Arm:
  """One compared method: fixed config overrides, and a grid tuned per method."""

  fixed: dict[str, Any]
  grid: dict[str, list] = dataclasses.field(default_factory=dict)

  def trials(self) -> list[dict[str, Any]]:
    keys = list(self.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


@dataclasses.dataclass(frozen=True)
class Sweep:
  arms: dict[str, Arm]
  common: dict[str, Any] = dataclasses.field(default_factory=dict)
  seeds: tuple[int, ...] = (0,)
  baseline: str = "adamw"
  budgets: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep, in ``WORKDIR/runs/<name>``."""

  arm: str
  trial: dict[str, Any]
  seed: int
  budget: float = 1.0

  @property
  def name(self) -> str:
    key = "_".join(f"{field.rsplit('.', 1)[-1]}={_fmt(v)}" for field, v in self.trial.items()) or "default"
    suffix = "" if self.budget == 1.0 else f"_x{_fmt(self.budget)}"
    return f"{self.arm}/{re.sub(r'[^A-Za-z0-9=._-]', '-', key)}_s{self.seed}{suffix}"

  def overrides(self, sweep: Sweep, base_steps: int, command_line: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's config fields: sweep.common < arm.fixed < trial < seed < ``command_line`` < budget steps."""
    out = {**sweep.common, **sweep.arms[self.arm].fixed, **self.trial, "seed": self.seed, **(command_line or {})}
    if self.budget != 1.0:
      out["train.steps"] = max(1, int(round(base_steps * self.budget)))
    return out


def _fmt(value) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def load_sweep(path: str) -> Sweep:
  """Calls ``get_sweep()`` in a sweep file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"sweep file {path!r} not found")
  spec = importlib.util.spec_from_file_location("moejax_user_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep()
  check_sweep(sweep)
  return sweep


def check_sweep(sweep: Sweep) -> None:
  """Raises ConfigError naming every problem of the sweep itself."""
  e = []
  if not sweep.arms:
    e.append("sweep.arms is empty; give at least the baseline and one other arm.")
  if sweep.baseline not in sweep.arms:
    e.append(f"sweep.baseline={sweep.baseline!r} is not one of the arms {sorted(sweep.arms)}.")
  counts = {name: len(arm.trials()) for name, arm in sweep.arms.items()}
  if len(set(counts.values())) > 1:
    e.append(f"arms have different numbers of trials {counts}: give every arm the same tuning budget "
             "(grids whose list lengths multiply to the same number).")
  for name, arm in sweep.arms.items():
    for field, values in arm.grid.items():
      if not isinstance(values, (list, tuple)) or not values:
        e.append(f"arms[{name!r}].grid[{field!r}] must be a non-empty list of values, got {values!r}.")
  if not sweep.seeds:
    e.append("sweep.seeds is empty; give at least one seed (several, to report medians).")
  if any(b <= 0 or b == 1.0 for b in sweep.budgets):
    e.append(f"sweep.budgets={sweep.budgets} must be positive multiples of train.steps other than 1.")
  if e:
    raise config_lib.ConfigError("invalid sweep:\n  - " + "\n  - ".join(e))


# --quick: what a sweep is shrunk to so that a user can try it in minutes.
QUICK_COMMON = {"train.steps": 60, "train.eval_every": 20, "train.eval_batches": 2, "train.log_every": 10,
                "train.checkpoint_every": 60, "optim.warmup_steps": 6}


def quick(sweep: Sweep) -> Sweep:
  """One trial per arm (the middle value of each grid list), the first seed, no budget runs, 60 steps."""
  arms = {name: Arm(arm.fixed, {field: [values[len(values) // 2]] for field, values in arm.grid.items()})
          for name, arm in sweep.arms.items()}
  return dataclasses.replace(sweep, arms=arms, common={**sweep.common, **QUICK_COMMON}, seeds=sweep.seeds[:1],
                             budgets=())


def check_command_line(sweep: Sweep, command_line: dict[str, Any]) -> None:
  """Refuses --config.FIELD overrides of fields an arm fixes or tunes (they are what the sweep compares)."""
  compared: dict[str, str] = {}
  for name, arm in sweep.arms.items():
    for field in (*arm.fixed, *arm.grid):
      compared.setdefault(field, name)
  clash = [f"--config.{field} (set by arm {compared[field]!r})" for field in command_line if field in compared]
  if clash:
    raise config_lib.ConfigError(
        f"{', '.join(clash)}: the sweep's arms set these fields, so a command-line value would erase the "
        "comparison; change them in the sweep file (or drop the flag). Other --config.FIELD flags apply to "
        "every run.")


def run_config(base: ml_collections.ConfigDict, overrides: dict[str, Any], run_name: str) -> ml_collections.ConfigDict:
  """A copy of ``base`` with the run's overrides, validated."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  try:
    apply_config(cfg, overrides)
    validate(cfg)
  except config_lib.ConfigError as err:
    raise config_lib.ConfigError(f"run {run_name}: {err}") from None
  if cfg.train.eval_every <= 0:
    raise config_lib.ConfigError(f"run {run_name}: train.eval_every={cfg.train.eval_every}; sweeps compare "
                                 "validation losses, set train.eval_every > 0 (e.g. in sweep.common).")
  return cfg


def main_runs(sweep: Sweep) -> list[Run]:
  """Every arm x trial x seed (what is compared), baseline first."""
  arms = [sweep.baseline] + [a for a in sweep.arms if a != sweep.baseline]
  return [Run(arm, trial, seed) for arm in arms for trial in sweep.arms[arm].trials() for seed in sweep.seeds]


def budget_runs(sweep: Sweep, best_baseline_trial: dict[str, Any]) -> list[Run]:
  """The baseline's best trial at the other budgets (after the main runs)."""
  return [Run(sweep.baseline, best_baseline_trial, seed, budget)
          for budget in sweep.budgets for seed in sweep.seeds]


def tokens_per_step(cfg: ml_collections.ConfigDict) -> int:
  return cfg.train.batch_size * cfg.data.seq_len
