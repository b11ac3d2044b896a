"""From finished runs to the comparison: best trial per arm, medians, speedups.

Fair by construction (Marin's optimizer study, Wen et al., 2025):

* each arm at *its own* best trial, chosen by the median over seeds of the
  final validation loss (never a shared learning rate);
* comparisons at the end of training (rankings flip mid-run);
* speedup two ways: ``steps_speedup`` = steps the baseline needs to reach its
  own final loss / steps the arm needs to reach that loss (on the median
  validation curve, linearly interpolated between evaluations); and
  ``D_eff / D``: the baseline's final loss as a function of training tokens,
  fitted as ``L(D) = E + A (D / D_1)^-alpha`` on its runs at several budgets
  (``Sweep.budgets``; ``D_1`` = the main budget), inverted at the arm's final
  loss: the tokens the baseline would need to match the arm, over the
  tokens the arm used. The fit: for each alpha on a grid (0.02..3), E and A
  by linear least squares (A > 0 required); the alpha with the least squared
  error wins. Beyond the largest fitted budget D_eff is an extrapolation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any

import numpy as np

from moejax.sweep.spec import Run, Sweep


@dataclasses.dataclass
class Curve:
  """Validation loss at the evaluation steps (and the wall time and tokens there)."""

  steps: np.ndarray
  tokens: np.ndarray
  wall_s: np.ndarray
  loss: np.ndarray


@dataclasses.dataclass
class RunResult:
  run: Run
  curve: Curve
  final_eval_loss: float
  final_train_loss: float
  wall_s: float


def read_run(run: Run, run_dir: str, tokens_per_step: int) -> RunResult:
  """Curves from ``metrics.jsonl``.

  Wall time: each logged record covers ``(step - previous step) * tokens per
  step / tokens_per_s`` seconds (how MetricsWriter computes ``tokens_per_s``,
  evaluation time included). The first interval also holds compilation; it
  is replaced by its steps times the median seconds per step of the others.
  """
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = np.array([r["step"] for r in records], float)
  seconds = np.diff(np.concatenate([[0.0], steps])) * tokens_per_step / np.array([r["tokens_per_s"] for r in records])
  if len(seconds) > 1:
    per_step = np.median(seconds[1:] / np.diff(steps))
    seconds[0] = steps[0] * per_step
  wall = np.cumsum(seconds)
  evals = [i for i, r in enumerate(records) if "eval_loss" in r]
  loss = np.array([records[i]["eval_loss"] for i in evals], float)
  curve = Curve(steps[evals], steps[evals] * tokens_per_step, wall[evals], np.where(np.isfinite(loss), loss, np.inf))
  train_loss = records[-1]["loss"]
  return RunResult(run, curve, float(curve.loss[-1]), train_loss if math.isfinite(train_loss) else math.inf,
                   float(wall[-1]))


def median_curve(results: list[RunResult]) -> Curve:
  """Pointwise median over seeds (the runs share their evaluation steps)."""
  steps = results[0].curve.steps
  if any(len(r.curve.steps) != len(steps) or np.any(r.curve.steps != steps) for r in results):
    raise ValueError(f"runs {[r.run.name for r in results]} were evaluated at different steps")
  stack = lambda attr: np.median(np.stack([getattr(r.curve, attr) for r in results]), axis=0)
  return Curve(steps, results[0].curve.tokens, stack("wall_s"), stack("loss"))


def steps_to_reach(curve: Curve, target: float) -> float | None:
  """First step where the loss is <= target (interpolated), or None if never."""
  below = np.nonzero(curve.loss <= target)[0]
  if len(below) == 0:
    return None
  i = int(below[0])
  if i == 0:
    return float(curve.steps[0])
  s0, s1, l0, l1 = curve.steps[i - 1], curve.steps[i], curve.loss[i - 1], curve.loss[i]
  return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1))


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """``L(D) = E + A (D / d_ref)^-alpha``."""

  E: float
  A: float
  alpha: float
  d_ref: float

  def __call__(self, d):
    return self.E + self.A * (np.asarray(d, float) / self.d_ref) ** -self.alpha

  def tokens_for(self, loss: float) -> float:
    """The D at which the curve reaches ``loss`` (inf at or below E)."""
    if loss <= self.E:
      return math.inf
    return self.d_ref * ((loss - self.E) / self.A) ** (-1.0 / self.alpha)


def fit_power_law(tokens, losses, d_ref: float) -> PowerLaw:
  """Least squares over alpha in [0.02, 3] (grid) with E, A linear; needs >= 3 budgets."""
  d, loss = np.asarray(tokens, float), np.asarray(losses, float)
  if len(np.unique(d)) < 3:
    raise ValueError(f"a power-law fit needs >= 3 token budgets, got {sorted(set(d.tolist()))}")
  best = None
  for alpha in np.linspace(0.02, 3.0, 1491):
    x = np.stack([np.ones_like(d), (d / d_ref) ** -alpha], axis=1)
    (e, a), *_ = np.linalg.lstsq(x, loss, rcond=None)
    if e < 0:  # a loss has no negative floor: refit with E = 0
      e, a = 0.0, float(x[:, 1] @ loss / (x[:, 1] @ x[:, 1]))
    if a <= 0:
      continue
    sse = float(np.sum((x @ np.array([e, a]) - loss) ** 2))
    if best is None or sse < best[0]:
      best = (sse, PowerLaw(float(e), float(a), float(alpha), d_ref))
  if best is None:
    raise ValueError("no decreasing power law fits these losses (does loss fall with more tokens?)")
  return best[1]


@dataclasses.dataclass
class ArmSummary:
  arm: str
  trial_losses: list[tuple[dict[str, Any], list[float]]]  # (trial, final eval loss per seed)
  best_trial: dict[str, Any]
  best_results: list[RunResult]
  curve: Curve                  # median over seeds at the best trial
  final_loss: float             # median final eval loss at the best trial
  wall_s: float                 # median wall time at the best trial
  steps_to_target: float | None = None
  steps_speedup: float | None = None
  d_eff_ratio: float | None = None


@dataclasses.dataclass
class Comparison:
  arms: dict[str, ArmSummary]
  baseline: str
  target: float                     # the baseline's final loss
  fit: PowerLaw | None
  fit_points: list[tuple[float, float]]  # (tokens, median final loss) of the baseline budgets
  fit_error: str | None


def summarize(sweep: Sweep, results: list[RunResult], tokens_main: float) -> Comparison:
  arms = {}
  for name, arm in sweep.arms.items():
    mine = [r for r in results if r.run.arm == name and r.run.budget == 1.0]
    trial_losses = [(trial, [r.final_eval_loss for r in mine if r.run.trial == trial]) for trial in arm.trials()]
    best_trial, _ = min(trial_losses, key=lambda tl: statistics.median(tl[1]))
    best = [r for r in mine if r.run.trial == best_trial]
    arms[name] = ArmSummary(name, trial_losses, best_trial, best, median_curve(best),
                            statistics.median(r.final_eval_loss for r in best),
                            statistics.median(r.wall_s for r in best))

  base = arms[sweep.baseline]
  target = base.final_loss
  base_steps = steps_to_reach(base.curve, target)
  for summary in arms.values():
    summary.steps_to_target = steps_to_reach(summary.curve, target)
    if summary.steps_to_target:
      summary.steps_speedup = base_steps / summary.steps_to_target

  points = [(tokens_main, target)]
  for budget in sweep.budgets:
    losses = [r.final_eval_loss for r in results
              if r.run.arm == sweep.baseline and r.run.budget == budget and r.run.trial == base.best_trial]
    if losses:
      points.append((tokens_main * budget, statistics.median(losses)))
  points.sort()
  fit, fit_error = None, None
  try:
    fit = fit_power_law([p[0] for p in points], [p[1] for p in points], tokens_main)
  except ValueError as err:
    fit_error = str(err)
  if fit:
    for summary in arms.values():
      summary.d_eff_ratio = fit.tokens_for(summary.final_loss) / tokens_main
  return Comparison(arms, sweep.baseline, target, fit, points, fit_error)


def grid_edge_warnings(cmp: Comparison) -> list[str]:
  """One line per arm whose best trial sits on the edge of a numeric grid axis (the optimum may lie outside)."""
  warnings = []
  for s in cmp.arms.values():
    for key, best in s.best_trial.items():
      values = sorted({trial[key] for trial, _ in s.trial_losses})
      if len(values) < 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        continue
      if best in (values[0], values[-1]):
        side, where = ("smallest", "below") if best == values[0] else ("largest", "above")
        warnings.append(f"arm {s.arm!r}: its best {key}={best} is the {side} value of its grid {values}; the "
                        f"optimum may lie outside it: extend the grid {where} {best}.")
  return warnings

