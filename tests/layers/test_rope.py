"""Partial RoPE in both channel layouts, inverse rotation, YaRN frequencies."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.rope import Rope, Yarn, apply_rope
from tests.layers import attention_reference as ref
from tests.layers.test_attention import yarn_inv_freq
from tests.oracle import require


@pytest.mark.parametrize("dim", [0, 4])
@pytest.mark.parametrize("layout", ["half", "interleave"])
@pytest.mark.parametrize("part", ["leading", "trailing"])
def test_rope_matches_explicit_pair_rotations(dim, layout, part):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 3, 10)).astype(np.float32)
  pos = rng.integers(0, 1000, size=(2, 7))
  rope = Rope(500.0, dim=dim, layout=layout, part=part)
  got = apply_rope(jnp.asarray(x), jnp.asarray(pos), rope)
  for b in range(2):
    expected = ref.rotate(x[b], pos[b], 500.0, dim=dim, layout=layout, part=part)
    chex.assert_trees_all_close(got[b], expected.astype(np.float32), atol=3e-5)
  untouched = slice(dim, None) if part == "leading" else slice(0, 10 - dim)
  if dim:
    np.testing.assert_array_equal(np.asarray(got)[..., untouched], x[..., untouched])


@pytest.mark.parametrize("layout", ["half", "interleave"])
def test_scores_are_relative_and_inverse_undoes_rotation(layout):
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 8)).astype(np.float32)) for _ in range(2))
  rope = Rope(10_000.0, dim=4, layout=layout, part="trailing")
  score = lambda m, n: float(jnp.sum(apply_rope(q, jnp.array([[m]]), rope) * apply_rope(k, jnp.array([[n]]), rope)))
  np.testing.assert_allclose(score(5, 2), score(103, 100), rtol=1e-4)
  back = apply_rope(apply_rope(q, jnp.array([[37]]), rope), jnp.array([[37]]), rope, inverse=True)
  chex.assert_trees_all_close(back, q, atol=1e-5)


@pytest.mark.parametrize("dim,theta,factor,original", [(64, 10_000.0, 40.0, 4096), (64, 160_000.0, 16.0, 65536),
                                                       (8, 10_000.0, 4.0, 16)])
def test_yarn_frequencies_match_the_formula(dim, theta, factor, original):
  yarn = Yarn(factor=factor, original_max_len=original)
  expected = yarn_inv_freq(dim, theta, factor, original, 32.0, 1.0)
  np.testing.assert_allclose(yarn.frequencies(dim, theta), expected, rtol=1e-6)
  # Highest frequencies are kept, lowest ones divided by the factor.
  np.testing.assert_allclose(yarn.frequencies(dim, theta)[0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(yarn.frequencies(dim, theta)[-1], theta ** (-(dim - 2) / dim) / factor, rtol=1e-5)


@pytest.mark.parametrize("fields,cos_sin,softmax", [
    ({"factor": 40.0}, 0.1 * np.log(40) + 1, 1.0),                                      # Qwen / Llama style
    ({"factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0}, 1.0, (0.1 * np.log(40) + 1) ** 2),  # DeepSeek-V3
    ({"factor": 16.0, "attention_factor": 1.0}, 1.0, 1.0),                             # DeepSeek-V4 compress
])
def test_yarn_attention_scales(fields, cos_sin, softmax):
  yarn = Yarn(**fields)
  np.testing.assert_allclose(yarn.cos_sin_scale(), cos_sin, rtol=1e-6)
  np.testing.assert_allclose(yarn.softmax_scale(), softmax, rtol=1e-6)


def test_yarn_matches_transformers():
  torch = require("torch")
  require("transformers")
  from transformers import DeepseekV3Config
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  params = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}
  cfg = DeepseekV3Config(rope_parameters=params, max_position_embeddings=163840, qk_rope_head_dim=64)
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, torch.device("cpu"))
  yarn = Yarn(factor=40.0, original_max_len=4096, mscale=1.0, mscale_all_dim=1.0)
  np.testing.assert_allclose(yarn.frequencies(64, 10_000.0), inv_freq.numpy(), rtol=1e-6)
  np.testing.assert_allclose(yarn.cos_sin_scale(), attention_factor, rtol=1e-6)
