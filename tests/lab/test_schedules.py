"""Bias-update schedules and global- vs micro-batch balance statistics, against formulas written here."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax.config import ConfigError, base_config
from moejax.validation import validate
from moejax.layers.balancing import bias_update_rate
from moejax.layers.routers import update_router_bias
from tests.lab.helpers import tiny_lab_cfg

GAMMA, STOP = 0.01, 10


def formula(kind, s):
  if kind == "constant":
    return GAMMA
  if s >= STOP:
    return 0.0
  return {"step": GAMMA, "linear": GAMMA * (1 - s / STOP),
          "cosine": GAMMA * 0.5 * (1 + math.cos(math.pi * s / STOP))}[kind]


@pytest.mark.parametrize("kind", ["constant", "step", "linear", "cosine"])
def test_rate_follows_its_formula(kind):
  moe = base_config().model.moe
  moe.update(bias_update_rate=GAMMA, bias_update_schedule=kind, bias_update_steps=STOP)
  for s in [0, 1, 5, 9, 10, 11, 100]:
    np.testing.assert_allclose(float(bias_update_rate(moe, jnp.asarray(s))), formula(kind, s), rtol=1e-6, atol=1e-9)


def _model_cfg(**moe):
  c = base_config().model
  c.moe.update(bias_update_rate=GAMMA, **moe)
  return ml_collections.FrozenConfigDict(c)


def test_bias_update_global_vs_micro_batch_statistics():
  """Two micro-batches with loads [6,0,1,1] and [0,2,3,3]: globally [6,2,4,4] -> sign(4 - load) = [-1,1,0,0];
  per micro-batch signs [-1,1,1,1] and [1,1,-1,-1] -> mean [0,1,0,0]."""
  bias = {"l": {"router": {"bias": jnp.zeros(4)}}}
  stats = {"l": {"router": {"load": jnp.array([6.0, 2, 4, 4]), "balance_sign": jnp.array([0.0, 2, 0, 0]),
                            "balance_calls": jnp.array(2.0)}}}
  glob = update_router_bias(bias, stats, _model_cfg(balance_stats="global"), jnp.asarray(3))
  micro = update_router_bias(bias, stats, _model_cfg(balance_stats="micro"), jnp.asarray(3))
  np.testing.assert_allclose(glob["l"]["router"]["bias"], GAMMA * np.array([-1, 1, 0, 0]), rtol=1e-6)
  np.testing.assert_allclose(micro["l"]["router"]["bias"], GAMMA * np.array([0, 1, 0, 0]), rtol=1e-6)
  stopped = update_router_bias(bias, stats, _model_cfg(bias_update_schedule="step", bias_update_steps=3),
                               jnp.asarray(3))
  np.testing.assert_array_equal(stopped["l"]["router"]["bias"], np.zeros(4))


def test_micro_statistics_in_a_train_step_use_each_micro_batch(devices):
  """In a real train step with 2 micro-batches, the micro rule moves the bias by the mean of the two
  micro-batches' signs, computed here from their routed experts."""
  from moejax.lab.replay import routing_of
  from moejax.grad_accum import split_micro
  from moejax.train import Experiment

  cfg = tiny_lab_cfg(score="sigmoid", score_bias=True, balance_stats="micro")
  cfg.train.grad_accum_steps = 2
  exp = Experiment(cfg, devices[:1])
  state, batch = exp.init_state(), next(exp.data_iterator("train"))
  signs = []
  for i in range(2):
    micro = {k: np.asarray(v)[i] for k, v in split_micro({k: jnp.asarray(v) for k, v in batch.items()}, 2).items()}
    experts = routing_of(exp, state, micro)["layer_1/mlp"]
    load = np.bincount(experts.ravel(), minlength=4).astype(np.float32)
    signs.append(np.sign(load.mean() - load))
  new_state, _ = exp.train_step(state, batch)
  np.testing.assert_allclose(new_state.model_state["router_bias"]["layer_1"]["mlp"]["router"]["bias"],
                             cfg.model.moe.bias_update_rate * np.mean(signs, 0),
                             rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("field, value, needle", [
    ("bias_update_schedule", "exp", "bias_update_schedule='exp'"),
    ("balance_stats", "local", "balance_stats='local'"),
    ("bias_update_schedule", "step", "bias_update_steps > 0")])
def test_bad_balancing_fields_name_the_field(field, value, needle):
  cfg = tiny_lab_cfg()
  cfg.model.moe[field] = value
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
    validate(cfg)
