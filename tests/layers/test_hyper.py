"""Manifold-constrained hyper-connections against a per-token NumPy reference,
the plain residual left bit-identical, and parity with transformers' V4."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from moejax.layers.attention import ATTENTION
from moejax.layers.hyper import HyperConnection, HyperHead, sinkhorn
from moejax.layers.mlp import MLP
from moejax.layers.norms import RMSNorm
from moejax.models import Block, Transformer
from tests.helpers import tiny_model_cfg, unboxed_init  # importing helpers registers "linear_test"
from tests.oracle import require

ATOL, RTOL = 2e-5, 2e-5


# ---------------------------------------------------------------- reference

def np_sinkhorn(comb_NxN, iters, eps):
  """Column normalisation, then (row, column) rounds, one line at a time."""
  c = np.array(comb_NxN, np.float64)
  n = c.shape[0]
  for j in range(n):
    c[:, j] /= c[:, j].sum() + eps
  for _ in range(iters - 1):
    for i in range(n):
      c[i, :] /= c[i, :].sum() + eps
    for j in range(n):
      c[:, j] /= c[:, j].sum() + eps
  return c


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def np_mixes(h_NxD, fn_NxDxM, norm_eps):
  flat = h_NxD.reshape(-1)
  flat = flat / np.sqrt(np.mean(flat ** 2) + norm_eps)
  return flat @ fn_NxDxM.reshape(flat.shape[0], -1)


def np_hyper_connection(h_NxD, p, iters, eps, norm_eps):
  """One token: (post_N, comb_NxN, x_D) as DeepSeek-V4 defines them."""
  n = h_NxD.shape[0]
  mixes = np_mixes(h_NxD, p["fn"], norm_eps)
  base, scale = p["base"], p["scale"]
  pre = np_sigmoid(mixes[:n] * scale[0] + base[:n]) + eps
  post = 2.0 * np_sigmoid(mixes[n:2 * n] * scale[1] + base[n:2 * n])
  logits = (mixes[2 * n:] * scale[2] + base[2 * n:]).reshape(n, n)
  comb = np.exp(logits - logits.max(axis=1, keepdims=True))
  comb = comb / comb.sum(axis=1, keepdims=True) + eps
  comb = np_sinkhorn(comb, iters, eps)
  x = sum(pre[i] * h_NxD[i] for i in range(n))
  return post, comb, x


def np_mix(h_NxD, y_D, post_N, comb_NxN):
  """h'_k = post_k y + sum_j comb[j, k] h_j (comb applied transposed)."""
  n = h_NxD.shape[0]
  return np.stack([post_N[k] * y_D + sum(comb_NxN[j, k] * h_NxD[j] for j in range(n)) for k in range(n)])


def np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x ** 2) + eps) * scale


def np_model(params, tokens_BxT, cfg):
  """The mHC Transformer with linear sublayers, token by token (float64)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  n, iters, eps, neps = cfg.hc.streams, cfg.hc.sinkhorn_iters, cfg.hc.eps, cfg.norm_eps
  b, t = tokens_BxT.shape
  logits = np.zeros((b, t, cfg.vocab_size))
  for bi in range(b):
    for ti in range(t):
      h = np.stack([p["embed"][tokens_BxT[bi, ti]]] * n)
      for layer in range(cfg.num_layers):
        lp = p[f"layer_{layer}"]
        for name in ("attention", "mlp"):
          post, comb, x = np_hyper_connection(h, lp[f"{name}_hc"], iters, eps, neps)
          y = np_rms_norm(x, lp[f"{name}_norm"]["scale"], neps) @ lp[name]["w"]
          h = np_mix(h, y, post, comb)
      hp = p["hc_head"]
      pre = np_sigmoid(np_mixes(h, hp["fn"], neps) * hp["scale"][0] + hp["base"]) + eps
      x = np_rms_norm(sum(pre[i] * h[i] for i in range(n)), p["final_norm"]["scale"], neps)
      logits[bi, ti] = x @ p["lm_head"]
  return logits


def _randomize(params, seed, std=0.5):
  """Replace every leaf by noise: 1 + N(0, std^2) for vectors (scales, biases),
  N(0, std^2) for matrices (mHC weights at init are near uniform, which would
  hide bugs in the mixes)."""
  rng = np.random.default_rng(seed)
  noise = lambda x: (x.ndim == 1) + std * rng.standard_normal(x.shape, np.float32)
  return jax.tree.map(lambda x: jnp.asarray(noise(x), x.dtype), params)


def _hc_cfg(streams, iters=20, **overrides):
  cfg = tiny_model_cfg(**overrides).as_configdict()
  cfg.hc.update(streams=streams, sinkhorn_iters=iters)
  return FrozenConfigDict(cfg)


def _linear_model_cfg(streams, iters):
  return _hc_cfg(streams, iters, num_layers=2, d_model=8, vocab_size=16,
                 attention_types=("linear_test",), mlp_types=("linear_test",))


# -------------------------------------------------------------------- tests

@pytest.mark.parametrize("streams,iters", [(4, 20), (3, 1)])
def test_mhc_transformer_matches_per_token_reference(streams, iters):
  cfg = _linear_model_cfg(streams, iters)
  model = Transformer(cfg)
  tokens = np.random.default_rng(0).integers(0, 16, size=(2, 3))
  params = _randomize(unboxed_init(model, jnp.asarray(tokens))["params"], seed=streams)
  got = model.apply({"params": params}, tokens)
  chex.assert_trees_all_close(got, np_model(params, tokens, cfg).astype(np.float32), atol=ATOL, rtol=RTOL)


def test_hyper_connection_weights_match_reference_and_comb_is_doubly_stochastic():
  cfg = _hc_cfg(4)
  h = jax.random.normal(jax.random.key(1), (2, 5, 4, 16))
  module = HyperConnection(cfg)
  params = _randomize(unboxed_init(module, h)["params"], seed=3, std=0.1)
  post, comb, x = module.apply({"params": params}, h)
  chex.assert_shape((post, comb, x), [(2, 5, 4), (2, 5, 4, 4), (2, 5, 16)])
  assert post.dtype == comb.dtype == jnp.float32
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for b in range(2):
    for t in range(5):
      want = np_hyper_connection(np.asarray(h[b, t], np.float64), p, 20, cfg.hc.eps, cfg.norm_eps)
      for got_, want_ in zip((post[b, t], comb[b, t], x[b, t]), want):
        np.testing.assert_allclose(got_, want_, atol=ATOL, rtol=RTOL)
  # Columns are normalised last (exact up to eps); rows after 20 rounds.
  np.testing.assert_allclose(jnp.sum(comb, axis=-2), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.sum(comb, axis=-1), 1.0, atol=1e-3)
  assert float(jnp.min(comb)) > 0


def test_sinkhorn_converges_to_doubly_stochastic():
  logits = jax.random.normal(jax.random.key(0), (64, 4, 4))
  comb = sinkhorn(jax.nn.softmax(logits, axis=-1) + 1e-6, iters=200, eps=1e-6)
  np.testing.assert_allclose(jnp.sum(comb, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.sum(comb, axis=-2), 1.0, atol=1e-5)
  np.testing.assert_allclose(comb[0], np_sinkhorn(jax.nn.softmax(logits[0], -1) + 1e-6, 200, 1e-6), atol=1e-6)


def test_one_stream_is_the_plain_residual_bit_for_bit():
  """streams=1 keeps the pre-mHC block: same parameter tree, same bits."""

  class PlainBlock(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, x, positions, segment_ids, token_ids):
      cfg = self.cfg
      norm = lambda name: RMSNorm(cfg.norm_eps, jnp.float32, jnp.float32, name=name)
      x = x + ATTENTION.get("dense")(cfg=cfg, name="attention")(norm("attention_norm")(x), positions, segment_ids)
      return x + MLP.get("dense")(cfg=cfg, name="mlp")(norm("mlp_norm")(x), token_ids)

  cfg = tiny_model_cfg()
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  pos, seg, ids = jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), jnp.int32), jnp.zeros((2, 6), jnp.int32)
  variables = unboxed_init(Block(cfg, "dense", "dense"), x, pos, seg, ids)
  plain_variables = unboxed_init(PlainBlock(cfg), x, pos, seg, ids)
  assert jax.tree.structure(variables) == jax.tree.structure(plain_variables)
  np.testing.assert_array_equal(Block(cfg, "dense", "dense").apply(variables, x, pos, seg, ids),
                                PlainBlock(cfg).apply(variables, x, pos, seg, ids))


def test_mhc_parameter_layout_and_init():
  cfg = _linear_model_cfg(4, 20)
  boxed = Transformer(cfg).init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))["params"]
  hc = boxed["layer_0"]["attention_hc"]
  assert hc["fn"].names == (None, "embed", None) and hc["fn"].value.shape == (4, 8, 24)
  np.testing.assert_array_equal(hc["base"].value, 0.0)
  np.testing.assert_array_equal(hc["scale"].value, 1.0)
  assert abs(float(jnp.std(hc["fn"].value)) - cfg.init_std) < 0.2 * cfg.init_std
  assert boxed["hc_head"]["fn"].value.shape == (4, 8, 4)


# ---------------------------------------------- parity with transformers' V4

def _v4():
  torch = require("torch")
  v4 = require("transformers.models.deepseek_v4.modeling_deepseek_v4")
  return torch, v4


def _v4_config(v4, streams, d):
  from transformers import DeepseekV4Config

  return DeepseekV4Config(hidden_size=d, num_hidden_layers=1, num_attention_heads=2, head_dim=8, q_lora_rank=8,
                          o_lora_rank=8, o_groups=1, n_routed_experts=2, num_experts_per_tok=1,
                          moe_intermediate_size=8, index_n_heads=2, index_head_dim=8, index_topk=4,
                          layer_types=["sliding_attention"], mlp_layer_types=["moe"], vocab_size=32,
                          hc_mult=streams, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6)


def _torch_fn(torch, fn_NxDxM):
  """Our [N, D, M] projection as V4's [M, N*D] ``fn``."""
  n, d, m = fn_NxDxM.shape
  return torch.tensor(np.asarray(fn_NxDxM).reshape(n * d, m).T.copy())


def test_parity_with_transformers_v4_decoder_layer_and_head():
  torch, v4 = _v4()
  streams, d = 4, 16
  cfg = _hc_cfg(streams, d_model=d, attention_types=("linear_test",), mlp_types=("linear_test",))
  h = jax.random.normal(jax.random.key(0), (2, 5, streams, d))
  pos, seg, ids = jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32), jnp.zeros((2, 5), jnp.int32)
  block = Block(cfg, "linear_test", "linear_test")
  params = _randomize(unboxed_init(block, h, pos, seg, ids)["params"], seed=7, std=0.3)
  head = HyperHead(cfg)
  head_params = _randomize(unboxed_init(head, h)["params"], seed=8, std=0.3)

  class Linear(torch.nn.Module):
    def __init__(self, w, returns_pair):
      super().__init__()
      self.w, self.returns_pair = torch.tensor(np.asarray(w)), returns_pair

    def forward(self, x, **unused):
      return (x @ self.w, None) if self.returns_pair else x @ self.w

  layer = v4.DeepseekV4DecoderLayer(_v4_config(v4, streams, d), 0)
  layer.self_attn, layer.mlp = Linear(params["attention"]["w"], True), Linear(params["mlp"]["w"], False)
  torch_head = v4.DeepseekV4HyperHead(_v4_config(v4, streams, d))
  with torch.no_grad():
    for ours, theirs in (("attention", layer.attn_hc), ("mlp", layer.ffn_hc)):
      theirs.fn.copy_(_torch_fn(torch, params[f"{ours}_hc"]["fn"]))
      theirs.base.copy_(torch.tensor(np.asarray(params[f"{ours}_hc"]["base"])))
      theirs.scale.copy_(torch.tensor(np.asarray(params[f"{ours}_hc"]["scale"])))
    layer.input_layernorm.weight.copy_(torch.tensor(np.asarray(params["attention_norm"]["scale"])))
    layer.post_attention_layernorm.weight.copy_(torch.tensor(np.asarray(params["mlp_norm"]["scale"])))
    torch_head.hc_fn.copy_(_torch_fn(torch, head_params["fn"]))
    torch_head.hc_base.copy_(torch.tensor(np.asarray(head_params["base"])))
    torch_head.hc_scale.copy_(torch.tensor(np.asarray(head_params["scale"])))
    h_torch = torch.tensor(np.asarray(h))
    post, comb, collapsed = layer.attn_hc(h_torch)
    want_layer, want_head = layer(h_torch), torch_head(h_torch)

  got_post, got_comb, got_x = HyperConnection(cfg).apply({"params": params["attention_hc"]}, h)
  for got, want in ((got_post, post), (got_comb, comb), (got_x, collapsed)):
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(block.apply({"params": params}, h, pos, seg, ids), want_layer.numpy(),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(head.apply({"params": head_params}, h), want_head.numpy(), atol=1e-5, rtol=1e-5)
