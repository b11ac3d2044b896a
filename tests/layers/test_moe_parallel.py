"""Expert parallelism: sharded over the 8 forced CPU devices == one device."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.config import base_config, mesh_shape
from moejax.sharding import BATCH_AXES, LOGICAL_RULES, logical_sharding, make_mesh
from moejax.train import Experiment
from tests.layers.test_moe import D, init_moe, moe_cfg
from tests.test_train import small_train_cfg

pytestmark = pytest.mark.multidevice

MESHES = {
    "expert=8": dict(expert=8),
    "data=2,fsdp=2,expert=2": dict(data=2, fsdp=2, expert=2),
    "fsdp=2,expert=2,context=2": dict(fsdp=2, expert=2, context=2),
    "data=4,tensor=2 (no EP)": dict(data=4, tensor=2),
}
CASES = [(axes, "dropless") for axes in MESHES] + [("data=2,fsdp=2,expert=2", "capacity")]


def _mesh(devices, axes):
  cfg = base_config().mesh
  cfg.update(dict(data=1, fsdp=1, tensor=1, expert=1, context=1))
  cfg.update(axes)
  assert np.prod(list(mesh_shape(cfg, 8).values())) == 8
  return make_mesh(cfg, devices)


@pytest.mark.parametrize("axes,dispatch", CASES)
def test_expert_parallel_layer_equals_single_device(devices, axes, dispatch):
  """Forward and gradients (input and every parameter); capacity large enough to drop nothing."""
  cfg = moe_cfg(num_shared=1, score="sigmoid", renormalize=True, dispatch=dispatch, capacity_factor=4.0,
                backend="einsum")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 6, D)).astype(np.float32)
  ids = rng.integers(0, 48, size=(8, 6))
  cot = 0.05 * rng.normal(size=x.shape).astype(np.float32)  # gradients of order 1
  layer, variables = init_moe(cfg, x, ids)

  def loss(params, x):
    y = layer.apply({**variables, "params": params}, x, ids)
    return jnp.sum(y * cot), y

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, single_y), single_grads = jax.jit(grad_fn)(variables["params"], x)

  mesh = _mesh(devices, MESHES[axes])
  param_shardings = logical_sharding(mesh, jax.eval_shape(layer.init, jax.random.key(0), x, ids)["params"])
  x_sharding = NamedSharding(mesh, P(BATCH_AXES, "context"))
  params = jax.device_put(variables["params"], param_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    (_, y), grads = jax.jit(grad_fn, in_shardings=(param_shardings, x_sharding))(params, jax.device_put(x, x_sharding))
  chex.assert_trees_all_close(y, single_y, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads, single_grads, rtol=1e-4, atol=1e-6)
  if MESHES[axes].get("expert", 1) > 1:
    assert "expert" in str(params["w_gate"].sharding.spec)


def test_training_under_an_expert_mesh_gives_single_device_losses(devices):
  cfg = small_train_cfg(batch_size=8)
  cfg.data.update(seq_len=32, task_length=16)
  cfg.model.update(mlp_types=("dense", "moe"))
  cfg.model.moe.update(num_experts=8, top_k=2, expert_ffn_dim=32, num_shared=1, score="sigmoid", score_bias=True,
                       renormalize=True, bias_update_rate=0.01)
  cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=1)

  def run(devs):
    exp = Experiment(cfg, devs)
    state, data = exp.init_state(), exp.data_iterator("train")
    losses = []
    for _ in range(2):
      state, metrics = exp.train_step(state, next(data))
      losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), jax.device_get(state.model_state)

  single = run(devices[:1])
  cfg.mesh.update(data=2, expert=4)
  sharded = run(devices)
  np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
  chex.assert_trees_all_close(sharded[1], single[1], rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(sharded[2], single[2], rtol=1e-6, atol=1e-7)  # the balancing bias moved alike
