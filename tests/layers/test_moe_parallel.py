"""Expert parallelism: sharded over the 8 forced CPU devices == one device; a user router from docs/moe.md."""

import json
import logging
import re
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.config import base_config, load_config, mesh_shape
from moejax.layers.routers import ROUTERS
from moejax.sharding import BATCH_AXES, LOGICAL_RULES, logical_sharding, make_mesh
from moejax.train import Experiment, ExpertCollapseWatch, train
from tests.layers.test_moe import D, init_moe, moe_cfg

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]  # slow: scheduled first (tests/conftest.py)
MOE_DOC = Path(__file__).parents[2] / "docs" / "moe.md"

MESHES = {
    "expert=8": dict(expert=8),
    "data=2,fsdp=2,expert=2": dict(data=2, fsdp=2, expert=2),
    "fsdp=2,expert=2,context=2": dict(fsdp=2, expert=2, context=2),
    "data=4,tensor=2 (no EP)": dict(data=4, tensor=2),
    "fsdp=8 (EP over fsdp)": dict(fsdp=8),  # moejax.sharding.EXPERT_AXES: experts split over fsdp too
}
CASES = [("expert=8", "dropless"), ("data=2,fsdp=2,expert=2", "dropless"), ("fsdp=2,expert=2,context=2", "dropless"),
         ("data=4,tensor=2 (no EP)", "capacity"), ("fsdp=8 (EP over fsdp)", "capacity")]


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
  for axis in ("fsdp", "expert"):  # experts split over both (and the d_model of each expert whole)
    if MESHES[axes].get(axis, 1) > 1:
      assert axis in params["w_gate"].sharding.spec[0] and params["w_gate"].sharding.spec[1] is None


def test_documented_router_trains_under_an_expert_mesh_as_on_one_device(tmp_path, devices, monkeypatch, caplog):
  """docs/moe.md's "Write your own router" snippet in a user config file, next to
  a hash layer: the training loop under mesh data=2, expert=4 gives the
  single-device losses and parameters, logs per-expert loads to metrics.jsonl
  and warns on collapsed experts."""
  section = MOE_DOC.read_text().split("## Write your own router")[1]
  snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  config = tmp_path / "my_moe.py"
  config.write_text(snippet + '''
from moejax.config import base_config


def get_config():
  c = base_config()
  c.model.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=64, mlp_types=("hash_moe", "moe"))
  # Capacity large enough to drop nothing: one compiled capacity (the dropless
  # ladder under expert parallelism is checked layer by layer above).
  c.model.moe.update(router="top_p", num_experts=8, top_k=3, expert_ffn_dim=16, num_shared=1,
                     load_balance_weight=0.01, dispatch="capacity", capacity_factor=4.0, collapse_steps=2)
  c.data.update(source="copy", seq_len=32, task_length=16)
  c.train.update(steps=2, batch_size=8, log_every=1, eval_every=0, checkpoint_every=2)
  c.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=1)
  return c
''')
  cfg = load_config(str(config))
  exp = Experiment(cfg, devices[:1])
  state, data = exp.init_state(), exp.data_iterator("train")
  single_losses = []
  for _ in range(2):
    state, metrics = exp.train_step(state, next(data))
    single_losses.append(float(metrics["loss"]))

  cfg = load_config(str(config))  # a config file run twice re-registers its router without complaint
  with cfg.unlocked():
    cfg.mesh.update(data=2, expert=4)
  monkeypatch.setattr(ExpertCollapseWatch, "THRESHOLD", 2.0)  # every expert counts as collapsed
  with caplog.at_level(logging.WARNING, logger="moejax.hooks"):
    sharded = train(cfg, str(tmp_path / "run"), devices)

  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  np.testing.assert_allclose([r["loss"] for r in records], single_losses, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(sharded.params), jax.device_get(state.params), rtol=1e-4, atol=1e-6)
  assert "expert" in str(sharded.params["layer_1"]["mlp"]["w_gate"].sharding.spec)
  for r in records:
    assert r["aux_loss"] > 0 and r["layer_0/mlp/dropped_fraction"] == r["layer_1/mlp/dropped_fraction"] == 0
    for layer in ("layer_0", "layer_1"):
      load = r[f"{layer}/mlp/expert_load"]
      assert len(load) == 8 and np.isclose(np.mean(load), 1.0, rtol=1e-3)
  collapsed = [r.message for r in caplog.records if "collapsed" in r.message]
  # One line per layer, naming every collapsed expert of that layer.
  assert sorted(m.split()[2] for m in collapsed) == ["layer_0/mlp", "layer_1/mlp"]
  assert all(m.startswith("step 2: layer_") and "(8 of 8)" in m for m in collapsed)
  router = ROUTERS.get("top_p")(cfg=exp.model.cfg)
  x = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
  expert_NxK, _, _ = router.apply({"params": state.params["layer_1"]["mlp"]["router"]}, x * 20, None)
  assert 0 < np.mean(np.asarray(expert_NxK) == 8) < 1  # some tokens leave slots empty
