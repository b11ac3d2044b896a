"""QK-clip: the sown max logit against brute force, per-head clipping on a toy whose
logits exceed tau, and the trainer's plumbing (max over micro-batches, clip applied)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.layers.attention import ATTENTION
from moejax.optim import qk_clip
from moejax.train import Experiment
from tests.helpers import np_rope, tiny_model_cfg
from tests.test_train import small_train_cfg


def reference_max_logits(x_BxTxD, p, positions_BxT, segment_ids_BxT, num_kv_heads, theta):
  """Per head: max of q.k/sqrt(Dh) over (real query t, visible key s), by loops."""
  b, t, _ = x_BxTxD.shape
  h = p["w_q"].shape[1]
  best = np.full(h, -np.inf)
  for bi in range(b):
    q = np_rope(np.einsum("TD,DHK->THK", x_BxTxD[bi], p["w_q"]), positions_BxT[bi], theta)
    k = np_rope(np.einsum("TD,DHK->THK", x_BxTxD[bi], p["w_k"]), positions_BxT[bi], theta)
    seg = segment_ids_BxT[bi]
    for head in range(h):
      kv = head // (h // num_kv_heads)
      for ti in range(t):
        for si in range(ti + 1):
          if seg[ti] > 0 and seg[si] == seg[ti]:
            best[head] = max(best[head], q[ti, head] @ k[si, kv] / np.sqrt(q.shape[-1]))
  return best


@functools.lru_cache
def _attention(num_heads, num_kv_heads, weight_scale=8.0):
  cfg = tiny_model_cfg(num_heads=num_heads, num_kv_heads=num_kv_heads, attention={"track_max_logit": True})
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, cfg.d_model)).astype(np.float32)
  segment_ids = np.array([[1] * 9, [1, 1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
  positions = np.array([list(range(9)), [0, 1, 2, 3, 0, 1, 2, 0, 0]], np.int32)
  attn = ATTENTION.get("dense")(cfg=cfg)
  params = jax.jit(lambda *a: nn.meta.unbox(attn.init(jax.random.key(0), *a)))(x, positions, segment_ids)["params"]
  return cfg, attn, jax.tree.map(lambda w: w * weight_scale, params), (x, positions, segment_ids)


@functools.lru_cache
def _apply(attn):
  return jax.jit(lambda p, *a: attn.apply({"params": p}, *a, mutable=["max_stats"])[1])


def _sown_max(attn, params, inputs):
  return np.asarray(_apply(attn)(params, *inputs)["max_stats"]["max_logit"][0])


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2)])
def test_sown_max_logit_matches_bruteforce(num_heads, num_kv_heads):
  cfg, attn, params, inputs = _attention(num_heads, num_kv_heads)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  expected = reference_max_logits(inputs[0].astype(np.float64), p64, inputs[1], inputs[2], num_kv_heads,
                                  cfg.rope_theta)
  np.testing.assert_allclose(_sown_max(attn, params, inputs), expected, rtol=1e-5)
  # The chunked (long-T) kernel in blocks smaller than T: 9 positions in blocks of 4.
  chunked_cfg = tiny_model_cfg(num_heads=num_heads, num_kv_heads=num_kv_heads,
                               attention={"track_max_logit": True, "implementation": "chunked", "chunk_size": 4})
  chunked = ATTENTION.get("dense")(cfg=chunked_cfg)
  np.testing.assert_allclose(_sown_max(chunked, params, inputs), expected, rtol=1e-5)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2)])
def test_qk_clip_caps_each_head_at_tau(num_heads, num_kv_heads):
  """Heads over tau end exactly at tau; heads under it keep their logits."""
  cfg, attn, params, inputs = _attention(num_heads, num_kv_heads)
  before = _sown_max(attn, params, inputs)
  tau = float(before.min()) + 1e-3  # one head under tau (its GQA sibling over it), the others over
  assert (before > tau).sum() == num_heads - 1
  tree = {"layer_0": {"attention": params}}
  tx = qk_clip(tau)
  zero = jax.tree.map(jnp.zeros_like, tree)
  u, _ = tx.update(zero, tx.init(tree), tree, max_logits={"layer_0/attention": jnp.asarray(before)})
  after = _sown_max(attn, optax.apply_updates(tree, u)["layer_0"]["attention"], inputs)
  np.testing.assert_allclose(after, np.minimum(before, tau), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(u["layer_0"]["attention"]["w_v"]), 0.0)


def test_trainer_takes_max_over_micro_batches_and_clips(devices):
  cfg = small_train_cfg(grad_accum_steps=2)
  cfg.model.update(num_layers=1, d_model=32, ffn_dim=64, init_std=0.2)
  cfg.model.attention.track_max_logit = True
  cfg.data.update(seq_len=32, task_length=16)
  cfg.optim.update(name="muon", qk_clip_tau=1.0)
  cfg.optim.muon.ns_dtype = "float32"
  exp = Experiment(cfg, devices[:1])
  state, batch = exp.init_state(), next(exp.data_iterator("train"))

  def max_logits(params):
    _, sown = exp.model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                              mutable=["max_stats"])
    return np.asarray(sown["max_stats"]["layer_0"]["attention"]["max_logit"][0])

  before = max_logits(state.params)
  assert before.max() > 2.0, before  # large init: the toy's logits exceed tau
  new_state, metrics = exp.train_step(state, batch)
  np.testing.assert_allclose(float(metrics["layer_0/attention/max_logit"]), before.max(), rtol=1e-5)
  # The clip acts on the updated weights with this step's maxima; the weights moved by
  # one small step in between, so the new maxima sit at tau up to that change.
  after = max_logits(new_state.params)
  assert np.all(after <= 1.05), after
