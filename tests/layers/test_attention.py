"""Attention types against a brute-force per-query NumPy reference."""

import chex
import jax
import numpy as np
import pytest

from moejax.layers.attention import ATTENTION
from tests.helpers import np_rope, tiny_model_cfg, unboxed_init


def reference_gqa(x_BxTxD, p, positions_BxT, segment_ids_BxT, num_heads, num_kv_heads, theta):
  """Loops over batch, head and query; the mask is spelled out per key."""
  b, t, _ = x_BxTxD.shape
  x = x_BxTxD.astype(np.float64)
  group = num_heads // num_kv_heads
  out = np.zeros((b, t, num_heads, p["w_q"].shape[-1]))
  for bi in range(b):
    q = np_rope(np.einsum("TD,DHK->THK", x[bi], p["w_q"]), positions_BxT[bi], theta)
    k = np_rope(np.einsum("TD,DHK->THK", x[bi], p["w_k"]), positions_BxT[bi], theta)
    v = np.einsum("TD,DHK->THK", x[bi], p["w_v"])
    seg = segment_ids_BxT[bi]
    for h in range(num_heads):
      kv = h // group
      for ti in range(t):
        keys = [s for s in range(t) if s <= ti and seg[s] == seg[ti] and (seg[ti] > 0 or s == ti)]
        logits = np.array([q[ti, h] @ k[s, kv] for s in keys]) / np.sqrt(q.shape[-1])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[bi, ti, h] = sum(wi * v[s, kv] for wi, s in zip(w, keys))
  return np.einsum("BTHK,HKD->BTD", out, p["w_o"])


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_dense_attention_matches_bruteforce(num_heads, num_kv_heads):
  cfg = tiny_model_cfg(num_heads=num_heads, num_kv_heads=num_kv_heads)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, cfg.d_model)).astype(np.float32)
  # Row 0: one document; row 1: two packed documents then padding.
  segment_ids = np.array([[1] * 9, [1, 1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
  positions = np.array([list(range(9)), [0, 1, 2, 3, 0, 1, 2, 0, 0]], np.int32)
  attn = ATTENTION.get("dense")(cfg=cfg)
  variables = unboxed_init(attn, x, positions, segment_ids)
  # Larger weights make the softmax far from uniform, so masking errors show.
  variables = jax.tree.map(lambda w: w * 8.0, variables)
  got = attn.apply(variables, x, positions, segment_ids)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  expected = reference_gqa(x, p, positions, segment_ids, num_heads, num_kv_heads, cfg.rope_theta)
  valid = segment_ids > 0
  chex.assert_trees_all_close(np.asarray(got)[valid], expected[valid].astype(np.float32), rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(got)))
