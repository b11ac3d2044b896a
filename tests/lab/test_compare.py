"""lab.compare: the table against the runs' own metrics.jsonl, resuming, a notebook router, and the plots."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import lab
from moejax.lab import plots
from moejax.lab.routing import TOKEN_CLASSES, expert_counts, token_class, topk_changed
from moejax.layers.routers import (
  ROUTER_RECIPES,
  ROUTERS,
  RouterAux,
  combine_weights,
  gate_logits,
)
from tests.lab.helpers import tiny_lab_cfg

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


class SigmoidTemperature(nn.Module):
  """A router as a notebook would write it: sigmoid top-k of logits / learned temperature."""

  cfg: object

  @nn.compact
  def __call__(self, x_NxD, token_ids_N):
    moe = self.cfg.moe
    logits_NxE = gate_logits(self, x_NxD) / (jax.nn.softplus(self.param("t", nn.initializers.zeros, ())) + 0.5)
    scores_NxE = jax.nn.sigmoid(logits_NxE)
    expert_NxK = jax.lax.top_k(scores_NxE, moe.top_k)[1].astype(jnp.int32)
    return (expert_NxK, combine_weights(scores_NxE, expert_NxK, moe),
            RouterAux(logits_NxE, scores_NxE / jnp.sum(scores_NxE, -1, keepdims=True)))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  cfg = tiny_lab_cfg(steps=4)
  cfg.train.update(checkpoint_every=2, eval_every=2, batch_size=8)  # the sweep trains on all 8 test devices
  workdir = str(tmp_path_factory.mktemp("lab"))
  return lab.compare(cfg, {"mixtral": "mixtral", "mine": SigmoidTemperature}, seeds=(0, 1), workdir=workdir)


def records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_variants_become_config_overrides():
  over = lab.variant_overrides("v", "v4")
  assert over["model.moe.score"] == "sqrtsoftplus" and over["model.moe.routed_scale"] == 1.5
  assert over["model.moe.num_groups"] == 1  # a field v4 does not set goes back to its default
  assert set(over) == {f"model.moe.{k}" for r in ROUTER_RECIPES.values() for k in r}
  assert lab.variant_overrides("v", {"recipe": "qwen3", "model.moe.top_k": 1})["model.moe.top_k"] == 1
  assert lab.variant_overrides("mine", SigmoidTemperature) == {"model.moe.router": "mine"}
  assert ROUTERS.get("mine") is SigmoidTemperature


def test_table_matches_the_runs_metrics(result):
  assert [r["variant"] for r in result.table] == ["mixtral", "mine"]
  for name, dirs in result.run_dirs.items():
    rows = []
    for run_dir in dirs:
      recs = records(run_dir)
      tail = recs[-5:]
      layer = "layer_1/mlp"
      loads = np.mean([r[f"{layer}/expert_load"] for r in tail], 0)
      rows.append({"eval_loss": [r["eval_loss"] for r in recs if "eval_loss" in r][-1],
                   "train_loss": np.mean([r["loss"] for r in tail]),
                   "load_max_over_mean": np.mean([r[f"{layer}/load_max_over_mean"] for r in tail]),
                   "load_min_over_mean": np.mean([r[f"{layer}/load_min_over_mean"] for r in tail]),
                   "router_entropy": np.mean([r[f"{layer}/router_entropy"] for r in tail]),
                   "dropped_fraction": np.mean([r[f"{layer}/dropped_fraction"] for r in tail]),
                   "dead_experts": int(np.sum(loads < 0.01)),
                   "tokens_per_s": np.median([r["tokens_per_s"] for r in recs[1:]])})
    row = next(r for r in result.table if r["variant"] == name)
    assert row["seeds"] == 2
    for key in rows[0]:
      np.testing.assert_allclose(row[key], np.mean([r[key] for r in rows]), rtol=1e-9, err_msg=key)
    np.testing.assert_allclose(row["eval_loss_std"], np.std([r["eval_loss"] for r in rows]), rtol=1e-9)
  assert "| mixtral |" in result.markdown() and os.path.exists(os.path.join(result.workdir, "table.md"))


def test_compare_resumes_without_training_again(result):
  before = {d: os.path.getmtime(os.path.join(d, "metrics.jsonl")) for ds in result.run_dirs.values() for d in ds}
  cfg = tiny_lab_cfg(steps=4)
  cfg.train.update(checkpoint_every=2, eval_every=2, batch_size=8)
  again = lab.compare(cfg, {"mixtral": "mixtral", "mine": SigmoidTemperature}, seeds=(0, 1), workdir=result.workdir)
  assert again.table == result.table
  assert before == {d: os.path.getmtime(os.path.join(d, "metrics.jsonl")) for d in before}


def test_plots_are_written(result):
  run_dir = result.run_dirs["mine"][0]
  figs = [plots.loss_curves(result), plots.balance_summary(result), plots.load_heatmap(run_dir)]
  assert all(len(f.axes) >= 1 for f in figs)
  for name in ("lab_loss_curves.png", "lab_balance.png"):
    assert os.path.getsize(os.path.join(result.workdir, name)) > 1000
  assert os.path.getsize(os.path.join(run_dir, "lab_expert_load.png")) > 1000


def test_routing_stability_and_specialisation_of_a_run(result):
  cfg, exp, state = lab.load_run(result.run_dirs["mine"][0])
  batches = lab.routing.domain_batches(cfg, "json", 1)
  rows = lab.routing.routing_stability(cfg, result.run_dirs["mine"][0], batches)
  assert [(r["from"], r["to"]) for r in rows] == [(2, 4)]
  assert 0.0 <= rows[0]["layer_1/mlp"] <= 1.0
  route = lambda b: lab.replay.routing_of(exp, state, b)
  shares = lab.routing.token_class_specialisation(route, batches, cfg.model.moe.num_experts)
  assert shares["layer_1/mlp"].shape == (len(TOKEN_CLASSES), 4)
  np.testing.assert_allclose(shares["layer_1/mlp"].sum(1)[shares["layer_1/mlp"].sum(1) > 0], 1.0)
  fig = plots.specialisation(shares, TOKEN_CLASSES, result.workdir)
  assert len(fig.axes) == 2 and plots.stability(rows, result.workdir).axes


def test_expert_counts_and_topk_changed_against_loops():
  rng = np.random.default_rng(0)
  experts = rng.integers(0, 5, size=(3, 7, 2))  # 4 experts, id 4 = empty slot
  groups = rng.integers(0, 3, size=(3, 7))
  counts = expert_counts({"l": experts}, groups, 3, 4)["l"]
  want = np.zeros((3, 4))
  for b in range(3):
    for t in range(7):
      for k in range(2):
        if experts[b, t, k] < 4:
          want[groups[b, t], experts[b, t, k]] += 1
  np.testing.assert_array_equal(counts, want)
  other = experts.copy()
  other[0, 0] = other[0, 0, ::-1]  # same set, other order: unchanged
  other[1, 2, 0] = (other[1, 2, 0] + 1) % 5
  changed = sum(set(experts[b, t]) != set(other[b, t]) for b in range(3) for t in range(7)) / 21
  assert topk_changed(experts, other) == pytest.approx(changed)
  assert [token_class(c) for c in (" ", "a", "7", ";", "é", "")] == [0, 1, 2, 3, 4, 4]
