"""The assembled Transformer: shapes, causality, document isolation, remat."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.models import Transformer
from moejax.models.block import remat_compiler_options
from tests.helpers import tiny_model_cfg, unboxed_init

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


def _model_and_vars(**overrides):
  model = Transformer(tiny_model_cfg(**overrides))
  return model, unboxed_init(model, jnp.zeros((1, 8), jnp.int32))


def test_logits_shape_dtype_and_param_axes():
  model, variables = _model_and_vars()
  tokens = jnp.ones((3, 11), jnp.int32)
  logits = model.apply(variables, tokens)
  chex.assert_shape(logits, (3, 11, 64))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)
  boxed = model.init(jax.random.key(0), tokens)["params"]
  assert boxed["layer_0"]["attention"]["w_q"].names == ("embed", "heads", "head_dim")
  assert boxed["embed"].names == ("vocab", "embed")


@pytest.mark.parametrize("tie", [False, True])
def test_changing_a_future_token_never_changes_earlier_logits(tie):
  model, variables = _model_and_vars(tie_embeddings=tie)
  tokens = np.random.default_rng(0).integers(0, 64, size=(2, 16))
  base = model.apply(variables, tokens)
  for t in (0, 7, 15):
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % 64
    out = model.apply(variables, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    assert not np.allclose(out[:, t], base[:, t])


def test_packed_documents_do_not_see_each_other():
  """A document packed after another gives the logits it has alone."""
  model, variables = _model_and_vars()
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(0, 64, 5), rng.integers(0, 64, 7)
  packed = np.concatenate([doc_a, doc_b, [0, 0]])[None]
  segments = np.array([[1] * 5 + [2] * 7 + [0, 0]])
  positions = np.array([list(range(5)) + list(range(7)) + [0, 0]])
  out = model.apply(variables, packed, positions, segments)
  alone_b = model.apply(variables, doc_b[None])
  alone_a = model.apply(variables, doc_a[None])
  chex.assert_trees_all_close(out[0, 5:12], alone_b[0], atol=1e-5)
  chex.assert_trees_all_close(out[0, :5], alone_a[0], atol=1e-5)


@pytest.mark.parametrize("policy", [("full",), ("dots",), ("dots_no_batch",), ("offload_dots",), ("full", "none")])
def test_remat_policies_change_nothing_numerically(policy):
  model, variables = _model_and_vars()
  remat_model = Transformer(tiny_model_cfg(remat=policy))
  tokens = np.random.default_rng(2).integers(0, 64, size=(2, 8))

  def loss(m):
    return lambda p: jnp.mean(m.apply({"params": p}, tokens) ** 2)

  g_plain = jax.grad(loss(model))(variables["params"])
  g_remat = jax.grad(loss(remat_model))(variables["params"])
  chex.assert_trees_all_close(g_plain, g_remat, rtol=1e-5, atol=1e-7)


def test_full_remat_holds_one_block_of_activations_under_the_remat_compiler_options():
  """``remat_compiler_options`` keeps XLA from merging each block's recomputation
  back into the forward pass, so the compiled gradient's temporaries stop
  growing with depth (``none``: every block's activations until its backward
  pass) while the gradients stay bit-identical."""
  tokens = np.random.default_rng(4).integers(0, 64, size=(1, 512))
  options = remat_compiler_options(jax.devices()[0].platform)
  params = {}

  def compiled(num_layers, remat):
    model = Transformer(tiny_model_cfg(num_layers=num_layers, ffn_dim=256, remat=(remat,)))
    params[num_layers] = unboxed_init(model, jnp.zeros((1, 8), jnp.int32))["params"]
    fn = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)), compiler_options=options)
    return fn.lower(params[num_layers]).compile()

  fns = {(remat, layers): compiled(layers, remat) for remat in ("none", "full") for layers in (1, 4)}
  temp = {key: fn.memory_analysis().temp_size_in_bytes for key, fn in fns.items()}
  per_layer = {r: (temp[r, 4] - temp[r, 1]) / 3 for r in ("none", "full")}
  assert per_layer["full"] < 0.2 * per_layer["none"], (temp, per_layer)
  chex.assert_trees_all_equal(fns["none", 4](params[4]), fns["full", 4](params[4]))  # bit-identical, as docs say


def test_per_layer_schedule_builds_one_block_per_entry():
  model, variables = _model_and_vars(num_layers=3, attention_types=("dense", "dense", "dense"))
  assert sorted(k for k in variables["params"] if k.startswith("layer_")) == ["layer_0", "layer_1", "layer_2"]


def test_moe_layers_in_the_schedule_keep_the_model_causal():
  """Dropless token-choice routing is per token, so MoE layers (hash included) keep causality."""
  model, variables = _model_and_vars(mlp_types=("hash_moe", "moe"))
  assert "w_gate" in variables["params"]["layer_1"]["mlp"] and "hash_table" in variables
  apply = jax.jit(model.apply)
  tokens = np.random.default_rng(3).integers(0, 64, size=(2, 12))
  base = apply(variables, tokens)
  changed = tokens.copy()
  changed[:, 8] = (changed[:, 8] + 1) % 64
  out = apply(variables, changed)
  np.testing.assert_array_equal(np.asarray(out[:, :8]), np.asarray(base[:, :8]))
  assert not np.allclose(out[:, 8], base[:, 8])
