"""Sweep planning and analysis on synthetic runs: fit, interpolation, best trials, wall time."""

import json

import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.sweep import Arm, Run, Sweep, fit_power_law, steps_to_reach, summarize
from moejax.sweep.analysis import Curve, RunResult, read_run
from moejax.sweep.spec import check_sweep, main_runs


def test_power_law_fit_recovers_parameters_and_inverts():
  d = np.array([0.25, 0.5, 1.0, 2.0, 4.0]) * 1e6
  loss = 1.5 + 2.0 * (d / 1e6) ** -0.4
  fit = fit_power_law(d, loss, 1e6)
  assert (fit.E, fit.A, fit.alpha) == pytest.approx((1.5, 2.0, 0.4), abs=2e-3)
  assert fit.tokens_for(float(fit(3e6))) == pytest.approx(3e6, rel=1e-6)
  assert fit.tokens_for(1.4) == np.inf
  with pytest.raises(ValueError, match=">= 3 token budgets"):
    fit_power_law(d[:2], loss[:2], 1e6)


def test_steps_to_reach_interpolates_between_evaluations():
  curve = Curve(np.array([10.0, 20.0, 30.0]), None, None, np.array([3.0, 2.0, 1.0]))
  assert steps_to_reach(curve, 1.5) == pytest.approx(25.0)
  assert steps_to_reach(curve, 3.5) == 10.0
  assert steps_to_reach(curve, 0.5) is None


def test_sweep_checks_equal_tuning_budget_and_baseline():
  arms = {"adamw": Arm({"optim.name": "adamw"}, {"optim.learning_rate": [1e-3, 3e-3]}),
          "muon": Arm({"optim.name": "muon"}, {"optim.learning_rate": [1e-2]})}
  with pytest.raises(ConfigError, match="same tuning budget") as err:
    check_sweep(Sweep(arms, baseline="sgd"))
  assert "sweep.baseline='sgd'" in str(err.value)


def test_runs_and_their_overrides():
  sweep = Sweep({"adamw": Arm({"optim.name": "adamw"}, {"optim.learning_rate": [1e-3, 3e-3]}),
                 "lion": Arm({"optim.name": "lion"}, {"optim.b2": [0.99], "optim.learning_rate": [1e-4, 3e-4]})},
                common={"train.steps": 100}, seeds=(0, 1), baseline="adamw", budgets=(0.5,))
  runs = main_runs(sweep)
  assert len(runs) == 8 and runs[0] == Run("adamw", {"optim.learning_rate": 1e-3}, 0)
  assert runs[-1].name == "lion/b2=0.99_learning_rate=0.0003_s1"
  half = Run("adamw", {"optim.learning_rate": 1e-3}, 1, budget=0.5)
  assert half.overrides(sweep, 100) == {"train.steps": 50, "optim.name": "adamw", "optim.learning_rate": 1e-3,
                                        "seed": 1}


def _result(arm, lr, seed, losses, budget=1.0):
  steps = np.arange(1, len(losses) + 1) * 10.0
  curve = Curve(steps, steps * 100, steps * 0.1, np.array(losses))
  return RunResult(Run(arm, {"optim.learning_rate": lr}, seed, budget), curve, losses[-1], losses[-1], steps[-1] * 0.1)


def test_each_arm_at_its_own_best_trial_by_median_over_seeds():
  sweep = Sweep({"adamw": Arm({}, {"optim.learning_rate": [1e-3, 1e-2]}),
                 "muon": Arm({}, {"optim.learning_rate": [1e-2, 1e-1]})}, seeds=(0, 1, 2), budgets=(0.5, 2.0))
  results = [
      # adamw: 1e-3 wins on the median (one lucky seed at 1e-2 must not decide).
      _result("adamw", 1e-3, 0, [4, 3, 2]), _result("adamw", 1e-3, 1, [4, 3, 2.2]),
      _result("adamw", 1e-3, 2, [4, 3, 2.1]),
      _result("adamw", 1e-2, 0, [4, 3, 1.5]), _result("adamw", 1e-2, 1, [4, 3, 2.5]),
      _result("adamw", 1e-2, 2, [4, 3, 2.6]),
      # muon: 1e-1 wins; reaches adamw's final loss (2.1) halfway between steps 10 and 20.
      _result("muon", 1e-2, 0, [4, 3, 2.5]), _result("muon", 1e-2, 1, [4, 3, 2.5]), _result("muon", 1e-2, 2, [4, 3, 2.5]),
      *[_result("muon", 1e-1, s, [2.6, 1.6, 1.5]) for s in range(3)],
      *[_result("adamw", 1e-3, s, [4, 3.5], budget=0.5) for s in range(3)],
      *[_result("adamw", 1e-3, s, [4, 3, 2, 1.8, 1.6, 1.5], budget=2.0) for s in range(3)],
  ]
  cmp = summarize(sweep, results, tokens_main=3000.0)
  assert cmp.arms["adamw"].best_trial == {"optim.learning_rate": 1e-3}
  assert cmp.arms["muon"].best_trial == {"optim.learning_rate": 1e-1}
  assert cmp.target == pytest.approx(2.1)
  assert cmp.arms["muon"].steps_to_target == pytest.approx(15.0)
  assert cmp.arms["muon"].steps_speedup == pytest.approx(30.0 / 15.0)
  assert cmp.fit_points == [(1500.0, 3.5), (3000.0, 2.1), (6000.0, 1.5)]
  assert cmp.arms["muon"].d_eff_ratio == pytest.approx(2.0, rel=0.05)  # muon's 1.5 = adamw at 2x tokens


def test_read_run_wall_time_excludes_compilation(tmp_path):
  records = [{"step": 10, "loss": 3.0, "tokens_per_s": 100.0},                     # 10 steps in 10 s (compile)
             {"step": 20, "loss": 2.5, "tokens_per_s": 500.0, "eval_loss": 2.6},  # 2 s
             {"step": 30, "loss": 2.0, "tokens_per_s": 500.0, "eval_loss": 2.1}]  # 2 s
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  result = read_run(Run("adamw", {}, 0), str(tmp_path), tokens_per_step=100)
  np.testing.assert_allclose(result.curve.wall_s, [4.0, 6.0])  # the first 10 steps at the later 0.2 s/step
  np.testing.assert_allclose(result.curve.tokens, [2000, 3000])
  assert (result.final_eval_loss, result.final_train_loss, result.wall_s) == (2.1, 2.0, 6.0)


def test_best_trial_on_the_edge_of_its_grid_is_warned_about(tmp_path):
  from moejax.sweep.analysis import grid_edge_warnings
  from moejax.sweep.report import write_markdown

  sweep = Sweep({"adamw": Arm({}, {"optim.learning_rate": [1e-3, 3e-3, 1e-2]}),
                 "lion": Arm({}, {"optim.learning_rate": [1e-4, 3e-4, 1e-3]})}, seeds=(0,), budgets=())
  results = [_result("adamw", lr, 0, [4, 3, loss]) for lr, loss in ((1e-3, 2.5), (3e-3, 2.2), (1e-2, 2.4))]
  results += [_result("lion", lr, 0, [4, 3, loss]) for lr, loss in ((1e-4, 2.9), (3e-4, 2.6), (1e-3, 2.3))]
  cmp = summarize(sweep, results, tokens_main=3000.0)
  warnings = grid_edge_warnings(cmp)
  assert warnings == ["arm 'lion': its best optim.learning_rate=0.001 is the largest value of its grid "
                      "[0.0001, 0.0003, 0.001]; the optimum may lie outside it: extend the grid above 0.001."]
  write_markdown(str(tmp_path / "results.md"), cmp, "# t", [])
  assert warnings[0] in (tmp_path / "results.md").read_text()
