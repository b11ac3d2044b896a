"""Every registered optimizer and schedule, by name from the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.config import base_config
from moejax.optim import OPTIMIZERS, SCHEDULES, build_optimizer


def _problem():
  """Least squares with a matrix, a bias and an embedding-like table."""
  rng = np.random.default_rng(0)
  x, w_true = rng.normal(size=(64, 16)), rng.normal(size=(16, 8))
  y = x @ w_true + 0.5
  params = {"layer_0": {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,))}, "embed": jnp.full((4, 8), 0.1)}

  def loss(p):
    pred = jnp.asarray(x, jnp.float32) @ p["layer_0"]["w"] + p["layer_0"]["b"] + jnp.mean(p["embed"])
    return jnp.mean((pred - jnp.asarray(y, jnp.float32)) ** 2)

  return params, loss


@pytest.mark.parametrize("name", sorted(OPTIMIZERS.names()))
def test_every_optimizer_reduces_a_least_squares_loss(name):
  o = base_config().optim
  o.update(name=name, learning_rate={"sgd": 0.05, "sophia": 0.05, "muon": 0.5, "optax_muon": 0.5}.get(name, 0.1), warmup_steps=2, weight_decay=0.0)
  o.muon.ns_dtype = "float32"
  tx, _ = build_optimizer(o, total_steps=40)
  params, loss = _problem()

  @jax.jit
  def step(p, s):
    grads = jax.grad(loss)(p)
    u, s = tx.update(grads, s, p, obj_fn=loss, max_logits={})
    return optax.apply_updates(p, u), s

  state = tx.init(params)
  start = float(loss(params))
  for _ in range(40):
    params, state = step(params, state)
  assert float(loss(params)) < 0.3 * start, (name, start, float(loss(params)))


def test_schedules():
  o = base_config().optim
  o.update(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
  values = {name: np.asarray([SCHEDULES.get(name)(o, 100)(s) for s in (0, 5, 10, 50, 80, 90, 100)])
            for name in SCHEDULES.names()}
  np.testing.assert_allclose(values["constant"], [0, 0.5, 1, 1, 1, 1, 1], atol=1e-6)
  np.testing.assert_allclose(values["wsd"], [0, 0.5, 1, 1, 1, 0.55, 0.1], atol=1e-6)
  cosine = values["cosine"]
  np.testing.assert_allclose(cosine[[0, 1, 2, 6]], [0, 0.5, 1, 0.1], atol=1e-6)
  np.testing.assert_allclose(cosine[3], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 40 / 90)), atol=1e-6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS.names()))
def test_every_optimizer_traces_in_the_trainer(name, devices):
  """Init (optimizer states sharded like their parameters, or replicated when shaped
  otherwise) and the train step (extra update arguments) trace for every optimizer."""
  import flax.linen as nn

  from moejax.train import Experiment
  from tests.test_train import small_train_cfg

  cfg = small_train_cfg()
  cfg.model.update(num_layers=1, d_model=32, ffn_dim=64)
  cfg.optim.name = name
  exp = Experiment(cfg, devices[:1])
  batch = next(exp.data_iterator("train"))
  with exp._context():
    state = jax.eval_shape(lambda: nn.meta.unbox(exp._boxed_init(jax.random.key(0))))
    _, metrics = jax.eval_shape(exp._train_step, state, batch, exp.extra)
  assert {"loss", "grad_norm", "layer_0/update_rms"} <= metrics.keys()
