"""Routers: aux-loss-free bias, hash table, expert choice (a user router: test_moe_parallel.py)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.moe_dispatch import capacity
from moejax.layers.routers import ROUTERS, update_router_bias
from moejax.layers.state import update_model_state
from moejax.registry import Registry
from tests.layers.test_moe import D, E, moe_cfg
from tests.layers.moe_reference import np_route

def test_selection_bias_moves_a_skewed_load_towards_uniform():
  """Tokens whose scores favour experts 0 and 1: the sign-rule bias updates
  spread them out while the weights still come from the unbiased scores."""
  cfg = moe_cfg(score="sigmoid", score_bias=True, bias_update_rate=0.02)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, D)).astype(np.float32)
  x[:, 0] = 2.0
  router = ROUTERS.get("topk")(cfg=cfg)
  variables = nn.meta.unbox(router.init(jax.random.key(0), x, None))
  w_gate = rng.normal(size=(D, E)).astype(np.float32) * 0.3
  w_gate[0, :2] += 1.5
  params, bias = {"w_gate": w_gate}, variables["router_bias"]

  @jax.jit
  def step(bias):
    (expert_NxK, weight_NxK, _), sown = router.apply({"params": params, "router_bias": bias}, x, None,
                                                     mutable=["stats"])
    load_E = sown["stats"]["load"]
    return update_router_bias(bias, sown["stats"], cfg), load_E, expert_NxK, weight_NxK

  ratios = []
  for _ in range(80):
    new_bias, load_E, expert_NxK, weight_NxK = step(bias)
    ratios.append(float(jnp.max(load_E) / jnp.mean(load_E)))
    # Selection uses the bias; the combine weights are the unbiased sigmoid scores.
    scores = jax.nn.sigmoid(x @ w_gate)
    np.testing.assert_allclose(weight_NxK, np.take_along_axis(scores, np.asarray(expert_NxK), 1), rtol=1e-5)
    routes, _, _ = np_route(x, None, w_gate, cfg.moe, np.asarray(bias["bias"], np.float64))
    assert [sorted(int(e) for e, _ in r) for r in routes] == [sorted(row) for row in np.asarray(expert_NxK).tolist()]
    bias = new_bias
  assert ratios[0] > 3.0 and max(ratios[-10:]) < 1.3, ratios
  assert np.all(np.asarray(bias["bias"])[:2] < 0)


def test_bias_update_is_the_sign_rule_and_other_state_is_untouched():
  cfg = moe_cfg(bias_update_rate=0.1)
  bias = {"layer_1": {"mlp": {"router": {"bias": jnp.zeros(4)}}}}
  stats = {"layer_1": {"mlp": {"router": {"load": jnp.array([5.0, 1.0, 3.0, 3.0])}}}}
  table = {"layer_0": {"mlp": {"router": {"tid2eid": jnp.arange(6).reshape(3, 2)}}}}
  new = update_model_state({"router_bias": bias, "hash_table": table}, stats, cfg)
  np.testing.assert_allclose(new["router_bias"]["layer_1"]["mlp"]["router"]["bias"], [-0.1, 0.1, 0.0, 0.0])
  assert new["hash_table"] is table


def test_hash_routing_is_a_frozen_deterministic_table_lookup():
  cfg = moe_cfg(score="sqrtsoftplus", renormalize=True, top_k=3)
  router = ROUTERS.get("hash")(cfg=cfg)
  x = np.zeros((5, D), np.float32)
  ids = np.array([3, 7, 3, 47, 0])
  table = router.init(jax.random.key(0), x, ids)["hash_table"]["tid2eid"]
  assert table.shape == (cfg.vocab_size, 3) and table.dtype == jnp.int32
  assert all(len(set(row)) == 3 and min(row) >= 0 and max(row) < E for row in np.asarray(table).tolist())
  np.testing.assert_array_equal(router.init(jax.random.key(0), x, ids)["hash_table"]["tid2eid"], table)
  assert not np.array_equal(router.init(jax.random.key(1), x, ids)["hash_table"]["tid2eid"], table)
  variables = router.init(jax.random.key(0), x, ids)
  for seed in range(2):  # whatever the hidden states: the experts are the table's rows
    x = np.random.default_rng(seed).normal(size=(5, D)).astype(np.float32)
    expert_NxK, weight_NxK, _ = router.apply(variables, x, ids)
    np.testing.assert_array_equal(expert_NxK, np.asarray(table)[ids])
    np.testing.assert_allclose(np.sum(weight_NxK, -1), 1.0, rtol=1e-6)


def test_expert_choice_gives_every_expert_exactly_its_capacity():
  cfg = moe_cfg(router="expert_choice", capacity_factor=1.5)
  x = np.random.default_rng(1).normal(size=(24, D)).astype(np.float32)
  router = ROUTERS.get("expert_choice")(cfg=cfg)
  variables = router.init(jax.random.key(0), x, None)
  expert_NxE, weight_NxE, aux = router.apply(variables, x, None)
  chosen = np.asarray(expert_NxE) < E
  np.testing.assert_array_equal(chosen.sum(0), capacity(24, 2, E, 1.5))
  np.testing.assert_array_equal(np.asarray(expert_NxE)[chosen], np.nonzero(chosen)[1])
  np.testing.assert_allclose(np.asarray(weight_NxE)[chosen], np.asarray(aux.probs_NxE)[chosen], rtol=1e-6)
  assert np.all(np.asarray(weight_NxE)[~chosen] == 0)


def test_registry_refuses_a_different_object_under_a_taken_name():
  registry = Registry("thing")
  registry.register("a")(int)
  with pytest.raises(ValueError, match="already registered"):
    registry.register("a")(float)
