"""Muon: which leaves it orthogonalizes, against optax.contrib.muon, per expert,
NorMuon and the update scalings against NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib._muon  # orthogonalize_via_newton_schulz: an independent Newton-Schulz
import pytest

from moejax.models import build_model
from moejax.optim import matrix_specs, muon
from moejax.optim.muon import MatrixSpec
from moejax.optim.newton_schulz import newton_schulz
from tests.helpers import tiny_model_cfg

F32 = dict(ns_dtype=jnp.float32)
QUINTIC = (3.4445, -4.7750, 2.0315)  # Keller Jordan's coefficients, written out


def _randn(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_moejax_param_tree_split():
  """The real model's tree, plus the leaves MoE / MLA / mHC layers add (by their axes)."""
  import flax.linen as nn

  model = build_model(tiny_model_cfg(num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, ffn_dim=64))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  shapes = {"/".join(k.key for k in p if hasattr(k, "key")): v.shape
            for p, v in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0]}
  axes = {"/".join(k.key for k in p): tuple(v)
          for p, v in jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(boxed),
                                                           is_leaf=lambda x: isinstance(x, tuple))[0]}
  extra = {  # path: (shape, logical axes) as the MoE / MLA / mHC helpers declare them
      "layer_1/mlp/w_gate": ((4, 32, 16), ("expert", "embed", "mlp")),
      "layer_1/mlp/w_down": ((4, 16, 32), ("expert", "mlp", "embed")),
      "layer_1/mlp/shared/w_up": ((32, 64), ("embed", "mlp")),
      "layer_1/mlp/router/w_gate": ((32, 4), ("embed", None)),
      "layer_1/mlp/router_bias": ((4,), ("expert",)),
      "layer_1/attention/w_dq": ((32, 24), ("embed", "q_lora")),
      "layer_1/attention/w_uq": ((24, 4, 8), ("q_lora", "heads", "head_dim")),
      "layer_1/attn_hc/fn": ((128, 24), (None, None)),
      "hc_head/fn": ((128, 4), (None, None)),
  }
  params = {**{k: jnp.zeros(s) for k, s in shapes.items()}, **{k: jnp.zeros(s) for k, (s, _) in extra.items()}}
  axes.update({k: a for k, (_, a) in extra.items()})
  got = {path: spec for path, spec in matrix_specs(params, axes).items() if spec}
  assert got == {
      "layer_0/attention/w_q": MatrixSpec((), (0,), (1, 2)),
      "layer_0/attention/w_k": MatrixSpec((), (0,), (1, 2)),
      "layer_0/attention/w_v": MatrixSpec((), (0,), (1, 2)),
      "layer_0/attention/w_o": MatrixSpec((), (0, 1), (2,)),
      "layer_0/mlp/w_gate": MatrixSpec((), (0,), (1,)),
      "layer_0/mlp/w_up": MatrixSpec((), (0,), (1,)),
      "layer_0/mlp/w_down": MatrixSpec((), (0,), (1,)),
      "layer_1/mlp/w_gate": MatrixSpec((0,), (1,), (2,)),
      "layer_1/mlp/w_down": MatrixSpec((0,), (1,), (2,)),
      "layer_1/mlp/shared/w_up": MatrixSpec((), (0,), (1,)),
      "layer_1/attention/w_dq": MatrixSpec((), (0,), (1,)),
      "layer_1/attention/w_uq": MatrixSpec((), (0,), (1, 2)),
  }
  # Everything else -- embed [V, D], lm_head [D, V], norms, router, biases, mHC -- is AdamW.
  assert {"embed", "lm_head", "final_norm/scale", "layer_1/mlp/router/w_gate", "hc_head/fn"} <= {
      p for p, spec in matrix_specs(params, axes).items() if spec is None}


@pytest.mark.parametrize("tie", [False, True])
def test_embeddings_and_lm_head_get_adamw_updates(tie):
  """A 2-D embedding table must not get Muon: its update is exactly AdamW's."""
  import flax.linen as nn

  model = build_model(tiny_model_cfg(num_layers=1, tie_embeddings=tie))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params, axes = jax.tree.map(lambda p: _randn(p.shape, 0), nn.meta.unbox(boxed)), nn.get_partition_spec(boxed)
  grads = jax.tree.map(lambda p: _randn(p.shape, p.size), params)
  ours = muon(1e-2, logical_axes=axes, **F32)
  adamw = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=lambda t: jax.tree.map(
      lambda p: p.ndim >= 2, t))
  u, _ = jax.jit(ours.update)(grads, ours.init(params), params)
  u_adam, _ = jax.jit(adamw.update)(grads, adamw.init(params), params)
  for name in ["embed"] + ([] if tie else ["lm_head"]):
    np.testing.assert_array_equal(np.asarray(u[name]), np.asarray(u_adam[name]))
  assert not np.allclose(np.asarray(u["layer_0"]["mlp"]["w_up"]), np.asarray(u_adam["layer_0"]["mlp"]["w_up"]))


def test_plain_pytree_matrix_to_muon_rest_to_adamw():
  params = {"w": _randn((24, 40), 0), "b": _randn((40,), 1), "tok_embed": _randn((50, 24), 2),
            "lm_head": _randn((24, 50), 3), "stack": _randn((2, 3, 4), 4)}
  assert {k: v is not None for k, v in matrix_specs(params).items()} == {
      "w": True, "b": False, "tok_embed": False, "lm_head": False, "stack": False}


@pytest.mark.parametrize("scale", ["keller", "moonlight"])
def test_matches_optax_contrib_muon_where_settings_coincide(scale):
  """Without Nesterov (optax's Nesterov is bias-corrected, ours is Keller Jordan's),
  float32, quintic, 5 steps: the same updates for the matrix and the AdamW leaf."""
  params = {"w": _randn((24, 40), 0), "b": _randn((40,), 1)}
  ours = muon(0.01, nesterov=False, scale=scale, weight_decay=0.1, **F32)
  theirs = optax.contrib.muon(0.01, nesterov=False, weight_decay=0.1, adam_b2=0.95,
                              consistent_rms=0.2 if scale == "moonlight" else None)
  state_ours, state_theirs, p_ours, p_theirs = ours.init(params), theirs.init(params), params, params
  for step in range(3):
    grads = {k: _randn(v.shape, 10 + step) for k, v in params.items()}
    u_ours, state_ours = jax.jit(ours.update)(grads, state_ours, p_ours)
    u_theirs, state_theirs = jax.jit(theirs.update)(grads, state_theirs, p_theirs)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=1e-5, atol=1e-7)
    p_ours, p_theirs = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_theirs, u_theirs)


def test_nesterov_matches_optax_contrib_muon_nesterov_once_bias_correction_fades():
  """Nesterov on, same hyper-parameters as optax.contrib.muon(nesterov=True). optax bias-corrects the two
  Nesterov terms, ``D = b M / (1 - b^(t+1)) + (1 - b) G / (1 - b^t)``; ours is Keller Jordan's
  ``D = b M + (1 - b) G``. Step 1 gives the same direction (NS is scale-invariant), steps 2-3 differ while
  the corrections differ, and from step ~20 (b = 0.5: b^20 ~ 1e-6) the updates agree again. Only the matrix
  is compared: with nesterov=True optax's AdamW branch becomes NAdam, ours stays AdamW."""
  beta = 0.5
  params = {"w": _randn((24, 40), 0), "b": _randn((40,), 1)}
  ours = muon(0.01, beta=beta, nesterov=True, scale="keller", weight_decay=0.1, **F32)
  theirs = optax.contrib.muon(0.01, beta=beta, nesterov=True, weight_decay=0.1, adam_b2=0.95)
  state_ours, state_theirs, p_ours, p_theirs = ours.init(params), theirs.init(params), params, params
  update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
  for step in range(1, 25):
    grads = {k: _randn(v.shape, 100 + step) for k, v in params.items()}
    u_ours, state_ours = update_ours(grads, state_ours, p_ours)
    u_theirs, state_theirs = update_theirs(grads, state_theirs, p_theirs)
    if step == 1 or step >= 20:
      chex.assert_trees_all_close(u_ours["w"], u_theirs["w"], rtol=1e-5, atol=1e-7, custom_message=f"step {step}")
    elif step in (2, 3):
      assert not np.allclose(u_ours["w"], u_theirs["w"], rtol=1e-3, atol=1e-6), step
    p_ours, p_theirs = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_theirs, u_theirs)
    # Keep both trajectories on the same parameters, so that each step compares one update rule.
    p_theirs = p_ours


def test_never_orthogonalizes_across_experts():
  """[E, m, n] stacks: expert e's update is Muon of expert e's gradient alone."""
  e, m, n = 4, 8, 12
  axes = {"moe": {"w_up": ("expert", "embed", "mlp")}}
  params = {"moe": {"w_up": jnp.zeros((e, m, n))}}
  tx = muon(1.0, logical_axes=axes, weight_decay=0.0, **F32)
  grads = _randn((e, m, n), 0)
  stacked, _ = jax.jit(tx.update)({"moe": {"w_up": grads}}, tx.init(params), params)
  single = muon(1.0, weight_decay=0.0, **F32)
  for i in range(e):
    p_i = {"w": params["moe"]["w_up"][i]}
    one, _ = jax.jit(single.update)({"w": grads[i]}, single.init(p_i), p_i)
    np.testing.assert_allclose(stacked["moe"]["w_up"][i], one["w"], rtol=1e-6, atol=1e-7)
  other = grads.at[1:].set(_randn((e - 1, m, n), 1) * 100.0)
  changed, _ = jax.jit(tx.update)({"moe": {"w_up": other}}, tx.init(params), params)
  np.testing.assert_allclose(changed["moe"]["w_up"][0], stacked["moe"]["w_up"][0], rtol=1e-6, atol=1e-7)


def test_nesterov_momentum_and_weight_decay_reference():
  """Two steps against the formula: D = b M + (1-b) G, W -= lr (s NS(D) + wd W)."""
  beta, lr, wd = 0.9, 0.05, 0.1
  w = _randn((16, 24), 0)
  tx = muon(lr, beta=beta, weight_decay=wd, scale="keller", **F32)
  state, params, mom = tx.init({"w": w}), {"w": w}, np.zeros((16, 24), np.float32)
  for step in range(2):
    g = _randn((16, 24), 1 + step)
    u, state = jax.jit(tx.update)({"w": g}, state, params)
    mom = beta * mom + (1 - beta) * np.asarray(g)
    d = beta * mom + (1 - beta) * np.asarray(g)
    # optax's Newton-Schulz (same quintic coefficients), not moejax's: the reference shares no code with muon().
    o = np.asarray(optax.contrib._muon.orthogonalize_via_newton_schulz(jnp.asarray(d), jnp.asarray(QUINTIC), 5))
    expected = -lr * (np.sqrt(24 / 16) * o + wd * np.asarray(params["w"]))
    np.testing.assert_allclose(u["w"], expected, rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, u)


@pytest.mark.parametrize("shape", [(16, 48), (48, 16)])
def test_moonlight_scaling_gives_rms_target(shape):
  """With an (almost exact) polar factor, RMS(update) = lr * rms for any shape."""
  tx = muon(1.0, coefficients="polar_express", ns_steps=8, weight_decay=0.0, rms=0.2, **F32)
  params = {"w": jnp.zeros(shape)}
  u, _ = jax.jit(tx.update)({"w": _randn(shape, 0)}, tx.init(params), params)
  np.testing.assert_allclose(float(jnp.sqrt(jnp.mean(u["w"] ** 2))), 0.2, rtol=1e-4)


def test_normuon_against_reference():
  """Per output neuron: v = b2 v + (1-b2) mean_in(O^2); O / sqrt(v), renormed to |O|_F."""
  b2, lr = 0.95, 1.0
  axes = {"w_o": ("heads", "head_dim", "embed")}  # fan_in (H, Dh), fan_out D
  params = {"w_o": jnp.zeros((2, 8, 12))}
  tx = muon(lr, logical_axes=axes, normuon=True, normuon_b2=b2, weight_decay=0.0, scale="keller", **F32)
  state, v = tx.init(params), np.zeros((1, 1, 12))
  mom = np.zeros((2, 8, 12))
  for step in range(2):
    g = _randn((2, 8, 12), step)
    u, state = jax.jit(tx.update)({"w_o": g}, state, params)
    mom = 0.95 * mom + 0.05 * np.asarray(g)
    d = 0.95 * mom + 0.05 * np.asarray(g)
    o = np.asarray(newton_schulz(jnp.asarray(d.reshape(1, 16, 12), jnp.float32), "quintic", 5, jnp.float32))
    o = o.reshape(2, 8, 12).astype(np.float64)
    v = b2 * v + (1 - b2) * np.mean(o**2, axis=(0, 1), keepdims=True)
    normed = o / (np.sqrt(v) + 1e-8)
    normed *= np.linalg.norm(o) / np.linalg.norm(normed)
    np.testing.assert_allclose(u["w_o"], -lr * normed, rtol=1e-4, atol=1e-6)


def test_muon_state_round_trips_through_a_checkpoint(tmp_path, devices):
  """MuonState (momentum, NorMuon moments, diagnostics) inside optax.partition's masked
  states saves and restores with the trainer's Checkpointer."""
  from moejax.checkpoint import Checkpointer
  from moejax.train import Experiment
  from tests.test_train import small_train_cfg

  cfg = small_train_cfg()
  cfg.model.update(num_layers=1, d_model=32, ffn_dim=64)
  cfg.optim.name = "muon"
  cfg.optim.muon.normuon = True
  exp = Experiment(cfg, devices[:1])
  leaves, treedef = jax.tree.flatten(exp.abstract_state)
  state = treedef.unflatten([np.full(s.shape, i, s.dtype) for i, s in enumerate(leaves)])
  ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
  ckpt.save(3, state)
  step, restored = ckpt.restore_latest(exp.abstract_state)
  ckpt.close()
  assert step == 3
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
