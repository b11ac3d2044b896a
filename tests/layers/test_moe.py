"""MoE layer and dispatch backends against a per-token NumPy brute force."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax.config import base_config
from moejax.layers import moe as moe_lib
from moejax.layers.mlp import MLP
from moejax.layers.moe_dispatch import (BACKENDS, DispatchSpec, ExpertWeights, available, capacity, dispatch,
                                        dropless_capacities, resolve_backend)
from tests.layers.moe_reference import np_dispatch, np_route, np_swiglu
from tests.oracle import require

D, F, E = 16, 8, 8


def moe_cfg(**moe_fields) -> ml_collections.FrozenConfigDict:
  cfg = base_config().model
  cfg.update(dict(num_layers=2, d_model=D, num_heads=2, num_kv_heads=1, ffn_dim=32, vocab_size=48))
  cfg.moe.update(dict(num_experts=E, top_k=2, expert_ffn_dim=F))
  cfg.moe.update(moe_fields)
  return ml_collections.FrozenConfigDict(cfg)


def init_moe(cfg, x, ids, mlp_type="moe", seed=1):
  """Random variables of the layer's shapes (no compiled init): weights large
  enough that routing and outputs are far from trivial, a random hash table."""
  layer = MLP.get(mlp_type)(cfg=cfg)
  shapes = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x, ids))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes["params"])
  params["router"]["w_gate"] *= 3.0
  variables = {"params": params}
  if "hash_table" in shapes:
    table = np.stack([rng.permutation(cfg.moe.num_experts)[:cfg.moe.top_k] for _ in range(cfg.vocab_size)])
    variables["hash_table"] = {"router": {"tid2eid": table.astype(np.int32)}}
  if "router_bias" in shapes:
    variables["router_bias"] = {"router": {"bias": rng.normal(size=cfg.moe.num_experts).astype(np.float32) * 0.1}}
  return layer, variables


def np_layer(cfg, variables, x_BxTxD, ids_BxT, router="topk", cap=None):
  """The whole layer in NumPy: routing, (capacity) dispatch, shared experts."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  x = x_BxTxD.reshape(-1, D)
  bias = variables.get("router_bias", {}).get("router", {}).get("bias")
  table = variables.get("hash_table", {}).get("router", {}).get("tid2eid")
  routes, _, _ = np_route(x, ids_BxT.reshape(-1), p["router"]["w_gate"], cfg.moe,
                          None if bias is None else np.asarray(bias, np.float64),
                          None if table is None else np.asarray(table), router)
  y, dropped = np_dispatch(x, routes, (p["w_gate"], p["w_up"], p["w_down"]), cfg.moe.swiglu_limit, cap)
  if cfg.moe.num_shared:
    s = p["shared"]
    y = y + np.stack([np_swiglu(row, s["w_gate"], s["w_up"], s["w_down"], cfg.moe.swiglu_limit) for row in x])
  return y.reshape(x_BxTxD.shape), dropped


ROUTINGS = {
    "qwen3 (softmax, top-k)": dict(score="softmax"),
    "mixtral (softmax, renormalised)": dict(score="softmax", renormalize=True),
    "deepseek-v3 (sigmoid, bias, groups, scale, 2 shared)": dict(
        score="sigmoid", score_bias=True, renormalize=True, routed_scale=2.5, num_groups=4, topk_groups=2,
        num_shared=2),
    "deepseek-v3, top-k beyond the kept groups (filled from the others)": dict(
        score="sigmoid", score_bias=True, renormalize=True, num_groups=4, topk_groups=1, top_k=3),
    "deepseek-v4 (sqrtsoftplus, clamp, shared)": dict(score="sqrtsoftplus", renormalize=True, routed_scale=1.5,
                                                      num_shared=1, swiglu_limit=0.5, top_k=3),
}
# Backends whose optional package is missing are left out here; their own tests skip visibly.
DROPLESS_BACKENDS = sorted(n for n in BACKENDS.names() if BACKENDS.get(n).dropless and available(n))
CAPACITY_BACKENDS = sorted(n for n in BACKENDS.names() if BACKENDS.get(n).capacity)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_dropless_layer_matches_bruteforce(routing):
  """Every routing recipe through the whole layer (the backends are compared below)."""
  cfg = moe_cfg(backend="einsum", **ROUTINGS[routing])
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, D)).astype(np.float32)
  ids = rng.integers(0, 48, size=(2, 7))
  layer, variables = init_moe(cfg, x, ids)
  y, sown = jax.jit(lambda v: layer.apply(v, x, ids, mutable=["metrics"]))(variables)
  expected, _ = np_layer(cfg, variables, x, ids)
  chex.assert_trees_all_close(np.asarray(y), expected.astype(np.float32), rtol=1e-4, atol=1e-5)
  assert float(sown["metrics"]["dropped_fraction"][0]) == 0.0


def test_capacity_is_the_smallest_slot_count_that_holds_factor_times_the_mean_load():
  """Written out: the least C >= 1 with C * E >= factor * N * k (C slots per expert hold factor x the
  mean load N k / E), never more than N (an expert holds each token at most once)."""
  for n, k, e, factor in [(18, 3, 8, 0.5), (18, 3, 8, 1.0), (18, 3, 8, 1.25), (1, 1, 64, 1.0), (4096, 6, 64, 1.0),
                          (10, 8, 2, 2.0), (7, 2, 16, 0.01), (24, 2, 8, 1.5), (96, 1, 3, 1.1)]:
    c = 1
    while c < n and c * e < factor * n * k - 1e-9:
      c += 1
    assert capacity(n, k, e, factor) == c, (n, k, e, factor)
  assert capacity(18, 3, 8, 0.5) == 4 and capacity(18, 3, 8, 1.0) == 7  # ceil(3.375), ceil(6.75)


@pytest.mark.parametrize("backend", CAPACITY_BACKENDS)
@pytest.mark.parametrize("factor,cap", [(0.5, 4), (1.0, 7)])  # ceil(factor * 18 tokens * 3 / 8 experts)
def test_capacity_mode_drops_like_the_reference(backend, factor, cap):
  cfg = moe_cfg(backend=backend, dispatch="capacity", capacity_factor=factor, top_k=3)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, D)).astype(np.float32)
  ids = rng.integers(0, 48, size=(2, 9))
  layer, variables = init_moe(cfg, x, ids)
  y, sown = jax.jit(lambda v: layer.apply(v, x, ids, mutable=["metrics"]))(variables)
  expected, dropped = np_layer(cfg, variables, x, ids, cap=cap)
  assert dropped > 0
  chex.assert_trees_all_close(np.asarray(y), expected.astype(np.float32), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(sown["metrics"]["dropped_fraction"][0]), dropped / 54, rtol=1e-6)


def test_hash_moe_and_expert_choice_layers_match_bruteforce():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, D)).astype(np.float32)
  ids = rng.integers(0, 48, size=(2, 6))
  for mlp_type, router, fields in [("hash_moe", "hash", dict(score="sqrtsoftplus", renormalize=True, num_shared=1)),
                                   ("moe", "expert_choice", dict(router="expert_choice", capacity_factor=1.5))]:
    cfg = moe_cfg(**fields)
    layer, variables = init_moe(cfg, x, ids, mlp_type)
    expected, _ = np_layer(cfg, variables, x, ids, router=router)
    chex.assert_trees_all_close(np.asarray(jax.jit(layer.apply)(variables, x, ids)), expected.astype(np.float32),
                                rtol=1e-4, atol=1e-5)


def _random_problem(seed, n, k, skew=0.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, E)) + skew * np.arange(E)[None]  # skew > 0 overloads the last experts
  expert_KxN = np.argsort(-logits, axis=1)[:, :k].T.astype(np.int32)
  weight_KxN = rng.random((k, n)).astype(np.float32)
  x = rng.normal(size=(n, D)).astype(np.float32)
  w = ExpertWeights(*(rng.normal(size=s).astype(np.float32) * 0.3 for s in [(E, D, F), (E, D, F), (E, F, D)]))
  return x, expert_KxN, weight_KxN, w


def _run(backend, x, expert_KxN, weight_KxN, w, dropless=True, limit=0.0):
  spec = DispatchSpec(num_experts=E, top_k=expert_KxN.shape[0], dropless=dropless, backend=backend,
                      swiglu_limit=limit)
  as_bt = lambda a: jnp.asarray(a).T[None]
  return lambda x, weight_KxN, w: dispatch(x[None], as_bt(expert_KxN), as_bt(weight_KxN), w, spec)[0][0]


@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_dropless_backends_agree_in_value_and_gradient(skew):
  """Every dropless backend, at every load (skew 3 puts most tokens on a few
  experts, forcing the largest einsum capacities), against the brute force."""
  x, expert_KxN, weight_KxN, w = _random_problem(3, 24, 3, skew)
  routes = [[(int(expert_KxN[k, i]), float(weight_KxN[k, i])) for k in range(3)] for i in range(24)]
  expected, _ = np_dispatch(x, routes, w, limit=0.7)
  cot = np.random.default_rng(4).normal(size=(24, D)).astype(np.float32)
  grads = {}
  for backend in DROPLESS_BACKENDS:
    fn = _run(backend, x, expert_KxN, weight_KxN, w, limit=0.7)
    chex.assert_trees_all_close(np.asarray(jax.jit(fn)(x, weight_KxN, w)), expected.astype(np.float32),
                                rtol=1e-4, atol=1e-5)
    grads[backend] = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2)))(x, weight_KxN, w)
  # Gradients of an independent dense formulation: every expert on every token, masked.
  def dense(x, weight_KxN, w):
    onehot_KxNxE = jax.nn.one_hot(expert_KxN, E)
    gate_NxE = jnp.einsum("KNE,KN->NE", onehot_KxNxE, weight_KxN)
    g, u = jnp.einsum("ND,EDF->NEF", x, w.gate_ExDxF), jnp.einsum("ND,EDF->NEF", x, w.up_ExDxF)
    g, u = jnp.minimum(g, 0.7), jnp.clip(u, -0.7, 0.7)
    return jnp.einsum("NEF,EFD,NE->ND", jax.nn.silu(g) * u, w.down_ExFxD, gate_NxE)
  reference = jax.grad(lambda *a: jnp.sum(dense(*a) * cot), argnums=(0, 1, 2))(x, weight_KxN, w)
  for backend, g in grads.items():
    chex.assert_trees_all_close(g, reference, rtol=1e-4, atol=1e-5, custom_message=backend)


@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_tokamax_backend_equals_einsum_in_value_and_gradient_with_empty_slots(skew):
  """``tokamax`` (CPU: tokamax's XLA ragged_dot) against ``einsum``, float32,
  with a quarter of the slots empty (expert id E, as expert-choice routing leaves them)."""
  require("tokamax", extra="kernels")
  x, expert_KxN, weight_KxN, w = _random_problem(5, 24, 3, skew)
  expert_KxN = np.where(np.random.default_rng(6).random(expert_KxN.shape) < 0.25, E, expert_KxN).astype(np.int32)
  cot = np.random.default_rng(7).normal(size=(24, D)).astype(np.float32)
  results = {}
  for backend in ("einsum", "tokamax"):
    fn = _run(backend, x, expert_KxN, weight_KxN, w, limit=0.7)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2)))(x, weight_KxN, w)
    results[backend] = (jax.jit(fn)(x, weight_KxN, w), grads)
  assert np.abs(np.asarray(results["einsum"][0])).max() > 0.1  # far from trivial
  chex.assert_trees_all_close(results["tokamax"], results["einsum"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("platform,dropless,expert_parallel,installed,expected", [
    ("cpu", True, False, True, "einsum"), ("gpu", True, False, True, "tokamax"), ("tpu", True, False, True, "tokamax"),
    ("gpu", True, False, False, "einsum"), ("tpu", True, False, False, "ragged_dot"),
    ("tpu", False, False, True, "einsum"), ("gpu", True, True, True, "einsum")])
def test_auto_backend_per_platform(monkeypatch, platform, dropless, expert_parallel, installed, expected):
  """``installed``: tokamax importable and working on the platform (library_kernels.tokamax_problem)."""
  from moejax.layers import moe_dispatch
  monkeypatch.setattr(moe_dispatch, "available", lambda name, platform=None: installed)
  assert resolve_backend("auto", dropless, expert_parallel, platform) == expected
  assert resolve_backend("onehot", dropless, expert_parallel, platform) == "onehot"


def test_dropless_capacity_ladder_covers_every_load():
  caps = dropless_capacities(num_tokens=4096, top_k=6, num_experts=64)
  assert caps[0] == 384 and caps[-1] == 4096 and list(caps) == sorted(set(caps))
  assert all(c % 8 == 0 for c in caps[:-1])
  assert dropless_capacities(num_tokens=10, top_k=2, num_experts=8)[-1] == 10


def test_balance_losses_and_z_loss_match_numpy():
  rng = np.random.default_rng(5)
  expert_BxTxK = rng.integers(0, E, size=(3, 5, 2))
  logits = rng.normal(size=(3, 5, E))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  counts = np.zeros((3, E))
  for b, t, k in np.ndindex(3, 5, 2):
    counts[b, expert_BxTxK[b, t, k]] += 1
  f_global, p_global = counts.sum(0) / 30, probs.mean((0, 1))
  switch = E * np.sum(f_global * p_global)
  seq = np.mean([E * np.sum(counts[b] / 10 * probs[b].mean(0)) for b in range(3)])
  z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  got_counts = moe_lib.expert_counts(jnp.asarray(expert_BxTxK), E)
  np.testing.assert_allclose(got_counts, counts)
  np.testing.assert_allclose(moe_lib.balance_loss(got_counts.sum(0)[None], jnp.asarray(p_global)[None]), switch,
                             rtol=1e-5)
  np.testing.assert_allclose(moe_lib.balance_loss(got_counts, jnp.asarray(probs.mean(1))), seq, rtol=1e-5)
  np.testing.assert_allclose(moe_lib.router_z_loss(jnp.asarray(logits.reshape(-1, E))), z, rtol=1e-5)
  # Uniform routing gives exactly 1.
  np.testing.assert_allclose(moe_lib.balance_loss(jnp.ones((1, E)), jnp.full((1, E), 1 / E)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_layer_balance_losses_match_numpy_from_raw_router_outputs(score):
  """The layer's Switch, sequence-wise and z losses (and their weighted sum) against NumPy that starts from
  the gate logits x W_gate: its own scores, top-k choice, counts and per-token probabilities."""
  b, t, k = 3, 7, 2
  rng = np.random.default_rng(8)
  x = rng.normal(size=(b, t, D)).astype(np.float32)
  ids = rng.integers(0, 48, size=(b, t))
  weights = dict(load_balance_weight=0.01, seq_balance_weight=0.003, z_loss_weight=1e-3)
  layer, variables = init_moe(moe_cfg(score=score, top_k=k, **weights), x, ids)
  _, sown = jax.jit(lambda v: layer.apply(v, x, ids, mutable=["aux_loss", "metrics"]))(variables)
  logits = x.reshape(-1, D).astype(np.float64) @ np.asarray(variables["params"]["router"]["w_gate"], np.float64)
  if score == "softmax":
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = probs
  else:
    chosen = 1 / (1 + np.exp(-logits))
    probs = chosen / chosen.sum(-1, keepdims=True)  # DeepSeek-V3's per-token normalised s'
  counts = np.zeros((b, E))
  for n, row in enumerate(chosen):
    for expert in np.argsort(-row)[:k]:
      counts[n // t, expert] += 1
  probs = probs.reshape(b, t, E)
  switch = E * np.sum(counts.sum(0) / (b * t * k) * probs.mean((0, 1)))
  seq = np.mean([E * np.sum(counts[i] / (t * k) * probs[i].mean(0)) for i in range(b)])
  z = np.mean(np.log(np.sum(np.exp(logits), -1)) ** 2)
  m = {key: float(v[0]) for key, v in sown["metrics"].items() if key != "expert_load"}
  np.testing.assert_allclose([m["load_balance_loss"], m["seq_balance_loss"], m["z_loss"]], [switch, seq, z], rtol=1e-5)
  np.testing.assert_allclose(float(sown["aux_loss"]["moe"][0]), 0.01 * switch + 0.003 * seq + 1e-3 * z, rtol=1e-5)
  np.testing.assert_allclose(sown["metrics"]["expert_load"][0], counts.sum(0) / counts.sum(0).mean(), rtol=1e-6)


def test_aux_losses_are_weighted_from_config_and_zero_by_default():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(2, 5, D)).astype(np.float32)
  ids = rng.integers(0, 48, size=(2, 5))
  layer, variables = init_moe(moe_cfg(), x, ids)
  _, sown = jax.jit(lambda v: layer.apply(v, x, ids, mutable=["aux_loss", "metrics"]))(variables)
  assert "aux_loss" not in sown or not jax.tree.leaves(sown["aux_loss"])
  weights = dict(load_balance_weight=0.01, seq_balance_weight=0.001, z_loss_weight=1e-3)
  layer, _ = init_moe(moe_cfg(**weights), x, ids)
  _, sown = jax.jit(lambda v: layer.apply(v, x, ids, mutable=["aux_loss", "metrics"]))(variables)
  m = {k: float(v[0]) for k, v in sown["metrics"].items() if k != "expert_load"}
  expected = 0.01 * m["load_balance_loss"] + 0.001 * m["seq_balance_loss"] + 1e-3 * m["z_loss"]
  np.testing.assert_allclose(float(sown["aux_loss"]["moe"][0]), expected, rtol=1e-6)
  for name, weight in [("load_balance_loss", 0.01), ("seq_balance_loss", 0.001), ("z_loss", 1e-3)]:
    np.testing.assert_allclose(m[f"{name}_weighted"], weight * m[name], rtol=1e-6)
  load = np.asarray(sown["metrics"]["expert_load"][0])
  assert load.shape == (E,) and np.isclose(load.mean(), 1.0)
  np.testing.assert_allclose(m["load_max_over_mean"], load.max(), rtol=1e-6)
  assert 0 < m["router_entropy"] <= np.log(E) + 1e-6


def test_parameter_layout_and_logical_axes():
  cfg = moe_cfg(num_shared=1)
  x, ids = np.zeros((1, 4, D), np.float32), np.zeros((1, 4), np.int32)
  boxed = jax.eval_shape(MLP.get("moe")(cfg=cfg).init, jax.random.key(0), x, ids)["params"]
  assert boxed["w_gate"].names == ("expert", "embed", "mlp") and boxed["w_gate"].value.shape == (E, D, F)
  assert boxed["w_up"].names == ("expert", "embed", "mlp") and boxed["w_up"].value.shape == (E, D, F)
  assert boxed["w_down"].names == ("expert", "mlp", "embed") and boxed["w_down"].value.shape == (E, F, D)
  assert boxed["router"]["w_gate"].names == ("embed", None) and boxed["router"]["w_gate"].value.shape == (D, E)
  assert boxed["shared"]["w_gate"].value.shape == (D, F)
