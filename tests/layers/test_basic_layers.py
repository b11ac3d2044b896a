"""RMSNorm, RoPE and SwiGLU against NumPy references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.mlp import MLP
from moejax.layers.norms import RMSNorm
from moejax.layers.rope import Rope, apply_rope
from tests.helpers import np_rope, tiny_model_cfg, unboxed_init


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32) * 3
  norm = RMSNorm(eps=1e-6)
  variables = unboxed_init(norm, x)
  scale = np.random.default_rng(1).normal(size=16).astype(np.float32)
  variables = {"params": {"scale": jnp.asarray(scale)}}
  expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6) * scale
  chex.assert_trees_all_close(norm.apply(variables, x), expected.astype(np.float32), rtol=1e-5, atol=1e-6)


def test_rope_matches_explicit_rotations():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 7, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 1000, size=(1, 7))
  got = apply_rope(jnp.asarray(x), jnp.asarray(pos), Rope(10_000.0))
  chex.assert_trees_all_close(got[0], np_rope(x[0], pos[0], 10_000.0).astype(np.float32), atol=2e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)).astype(np.float32))

  def score(m, n):
    qm = apply_rope(q, jnp.array([[m]]), Rope(10_000.0))
    kn = apply_rope(k, jnp.array([[n]]), Rope(10_000.0))
    return float(jnp.sum(qm * kn))

  np.testing.assert_allclose(score(5, 2), score(103, 100), rtol=1e-4)
  np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)


def test_swiglu_matches_numpy():
  cfg = tiny_model_cfg()
  x = np.random.default_rng(0).normal(size=(2, 3, cfg.d_model)).astype(np.float32)
  mlp = MLP.get("dense")(cfg=cfg)
  variables = unboxed_init(mlp, x)
  p = jax.tree.map(np.asarray, variables["params"])
  g, u = x @ p["w_gate"], x @ p["w_up"]
  expected = (g / (1 + np.exp(-g)) * u) @ p["w_down"]
  chex.assert_trees_all_close(mlp.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
