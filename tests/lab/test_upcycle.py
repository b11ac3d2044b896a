"""Dense -> MoE upcycling: step-0 logits equal the dense model's where the recipe promises it."""

import jax
import numpy as np
import pytest

from moejax.config import ConfigError
from moejax.lab.upcycle import preserves_function, upcycle_checkpoint, upcycle_params
from moejax.models import build_model
from moejax.train import Experiment, train
from tests.lab.helpers import tiny_lab_cfg

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

TOKENS = np.random.default_rng(0).integers(3, 200, size=(2, 16)).astype(np.int32)
# The experts run through the dispatch's einsums and sum K weighted copies: float32 rounding, not bit equality.
ATOL = 2e-5


def dense_and_moe(mode, **moe):
  dense = tiny_lab_cfg()
  dense.model.mlp_types = ("dense", "dense")
  moe_cfg = tiny_lab_cfg(**moe)
  if mode == "copy":
    moe_cfg.model.moe.expert_ffn_dim = dense.model.ffn_dim
  return dense, moe_cfg


def logits(cfg, params):
  return np.asarray(build_model(cfg.model).apply({"params": params}, TOKENS))


@pytest.fixture(scope="module")
def dense_params():
  dense, _ = dense_and_moe("copy")
  from flax.linen import meta

  return jax.tree.map(np.asarray, meta.unbox(build_model(dense.model).init(jax.random.key(3), TOKENS)["params"]))


def init_moe(cfg):
  from flax.linen import meta

  return meta.unbox(build_model(cfg.model).init(jax.random.key(5), TOKENS)["params"])


CASES = [  # (mode, moe fields, noise, router_init, promised)
    ("copy", dict(score="softmax", renormalize=True), 0.0, "fresh", True),
    ("copy", dict(score="sigmoid", renormalize=True, top_k=3), 0.0, "fresh", True),
    ("partition", dict(score="softmax", renormalize=True, top_k=4, expert_ffn_dim=16, routed_scale=4.0),
     0.0, "zeros", True),
    ("copy", dict(score="softmax", renormalize=False), 0.0, "fresh", False),
    ("copy", dict(score="softmax", renormalize=True), 0.1, "fresh", False),
    ("partition", dict(score="softmax", renormalize=True, top_k=2, expert_ffn_dim=16), 0.0, "fresh", False),
]


@pytest.mark.parametrize("mode, moe, noise, router_init, promised", CASES)
def test_step0_logits_equal_the_dense_model_where_promised(dense_params, mode, moe, noise, router_init, promised):
  dense_cfg, moe_cfg = dense_and_moe(mode, **moe)
  assert preserves_function(moe_cfg, mode, noise, router_init) == promised
  fresh = init_moe(moe_cfg)
  params = upcycle_params(dense_params, fresh, dense_cfg, moe_cfg, mode, noise, router_init)
  np.testing.assert_array_equal(params["embed"], dense_params["embed"])
  np.testing.assert_array_equal(params["layer_1"]["mlp"]["router"]["w_gate"],
                                0 * fresh["layer_1"]["mlp"]["router"]["w_gate"] if router_init == "zeros"
                                else fresh["layer_1"]["mlp"]["router"]["w_gate"])
  want, got = logits(dense_cfg, dense_params), logits(moe_cfg, params)
  if promised:
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  else:
    assert np.max(np.abs(got - want)) > 10 * ATOL


def test_partition_slices_the_ffn_width(dense_params):
  dense_cfg, moe_cfg = dense_and_moe("partition", expert_ffn_dim=16)
  params = upcycle_params(dense_params, init_moe(moe_cfg), dense_cfg, moe_cfg, "partition")
  w_up = dense_params["layer_1"]["mlp"]["w_up"]
  for e in range(4):
    np.testing.assert_array_equal(params["layer_1"]["mlp"]["w_up"][e], w_up[:, 16 * e:16 * (e + 1)])
    np.testing.assert_array_equal(params["layer_1"]["mlp"]["w_down"][e],
                                  dense_params["layer_1"]["mlp"]["w_down"][16 * e:16 * (e + 1)])


def test_upcycling_refuses_a_mismatched_pair():
  dense_cfg, moe_cfg = dense_and_moe("copy")
  moe_cfg.model.d_model = 64
  moe_cfg.model.moe.expert_ffn_dim = 32
  with pytest.raises(ConfigError, match=r"model fields \['d_model'\] differ(.|\n)*expert_ffn_dim == model.ffn_dim"):
    upcycle_params({}, {}, dense_cfg, moe_cfg, "copy")


def test_upcycle_a_dense_checkpoint_then_train_from_it(tmp_path, devices):
  dense_cfg, moe_cfg = dense_and_moe("copy", score="softmax", renormalize=True)
  dense_cfg.train.steps = moe_cfg.train.steps = 2
  train(dense_cfg, str(tmp_path / "dense"), devices[:1])
  exp, state = upcycle_checkpoint(dense_cfg, str(tmp_path / "dense"), moe_cfg, str(tmp_path / "moe"),
                                  devices=devices[:1])
  dense_exp = Experiment(dense_cfg, devices[:1])
  batch = next(dense_exp.data_iterator("validation"))
  from moejax.train import load_checkpoint

  _, _, dense_state = load_checkpoint(dense_cfg, str(tmp_path / "dense"), devices[:1])
  np.testing.assert_allclose(exp.token_stats(state, batch)[0], dense_exp.token_stats(dense_state, batch)[0],
                             atol=1e-4, rtol=0)
  final = train(moe_cfg, str(tmp_path / "moe"), devices[:1])
  assert int(final.step) == 2
