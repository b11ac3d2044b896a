"""Each enumeration of config values has one home, ``moejax/config.py``; the
implementation tables keyed by those names cover exactly them."""

import jax.numpy as jnp
import numpy as np

from moejax import config
from moejax.layers import DTYPES
from moejax.layers.routers import SCORE_FUNCTIONS
from moejax.models.block import CHECKPOINT_POLICIES
from moejax.sharding import BATCH_AXES, LOGICAL_RULES


def test_dtypes_map_every_config_name_to_its_jnp_type():
  assert tuple(DTYPES) == config.DTYPES
  for name, dtype in DTYPES.items():
    assert np.dtype(dtype) == np.dtype(jnp.zeros((), name).dtype)


def test_every_remat_name_but_none_has_a_checkpoint_policy():
  assert set(CHECKPOINT_POLICIES) == set(config.REMAT_POLICIES) - {"none"}


def test_every_score_name_has_a_function():
  assert set(SCORE_FUNCTIONS) == set(config.SCORES)
  logits = jnp.array([[0.5, -1.0, 2.0]])
  expected = {"softmax": np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum(),
              "sigmoid": 1 / (1 + np.exp(-np.array([0.5, -1.0, 2.0]))),
              "sqrtsoftplus": np.sqrt(np.log1p(np.exp([0.5, -1.0, 2.0])))}
  for name, fn in SCORE_FUNCTIONS.items():
    np.testing.assert_allclose(np.asarray(fn(logits))[0], expected[name], rtol=1e-6)


def test_batch_axes_are_mesh_axes_and_the_batch_rule():
  assert set(BATCH_AXES) <= set(config.MESH_AXES)
  assert dict(LOGICAL_RULES)["act_batch"] == BATCH_AXES
