"""Decode caches: chunked prefill + token-by-token decoding equals the full forward, per attention type.

The full forward (each type's training path) is itself tested against brute
force in test_attention*.py. Here every row is fed in its own chunk schedule
(chunks longer than the window, chunks that complete several compressed
windows, padded chunks, empty chunks, single tokens), so ring buffers wrap,
windows complete at different times per row and the top-k selection selects.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.attention import ATTENTION, cache
from tests.helpers import tiny_model_cfg
from tests.layers.test_attention import ALL_TYPES, _init

T = 48
# window 8 < the 11-token chunks; csa m=2, hca m=8: entries complete inside and across chunks;
# 24 csa entries / 48 keys vs top-k 4: the indexers select.
DECODE = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
              window=8, csa_ratio=2, hca_ratio=8, index_heads=2, index_head_dim=8, index_topk=4,
              o_groups=2, o_lora_rank=8, rope_dim=4, sinks=True, qk_norm=True, chunk_size=16)
# Tokens fed per call, per row; each call's width is the next of WIDTHS above the largest count.
PLANS = ([11, 11, 3, 3, 3] + [1] * (T - 31),
         [5, 11, 2, 0, 3] + [1] * (T - 21))
WIDTHS = (1, 11)  # two compiled shapes


def _decode_all(attn, variables, x_BxTxD, plans):
  """Feeds each row by its plan through ``attn.decode``; the outputs [B, T, D] at every position."""
  b = x_BxTxD.shape[0]
  step = jax.jit(lambda v, x, pos, seg: attn.apply(v, x, pos, seg, T, method="decode", mutable=["cache"]))
  cache_vars = None
  fed = np.zeros(b, np.int32)
  out = np.zeros(x_BxTxD.shape, np.float32)
  for counts in zip(*(list(p) + [0] * (max(map(len, plans)) - len(p)) for p in plans)):
    width = next(w for w in WIDTHS if w >= max(counts))
    x = np.zeros((b, width, x_BxTxD.shape[-1]), np.float32)
    for r, n in enumerate(counts):
      x[r, :n] = x_BxTxD[r, fed[r]:fed[r] + n]
    pos = fed[:, None] + np.arange(width, dtype=np.int32)
    seg = (np.arange(width) < np.array(counts)[:, None]).astype(np.int32)
    if cache_vars is None:  # the first call creates the cache (all zeros)
      cache_vars = jax.tree.map(jnp.zeros_like, jax.eval_shape(step, variables, x, pos, seg)[1])
    y, cache_vars = step({**variables, **cache_vars}, x, pos, seg)
    for r, n in enumerate(counts):
      out[r, fed[r]:fed[r] + n] = y[r, :n]
    fed += np.array(counts, np.int32)
  assert (fed == T).all()
  return out


@pytest.mark.parametrize("attention_type", ALL_TYPES)
def test_chunked_prefill_and_decode_equal_the_full_forward(attention_type):
  attn = ATTENTION.get(attention_type)(cfg=tiny_model_cfg(attention=DECODE))
  x = np.random.default_rng(0).normal(size=(2, T, 32)).astype(np.float32)
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
  segments = np.ones((2, T), np.int32)
  variables = _init(attn, x, positions, segments, scale=10.0)
  want = jax.jit(attn.apply)(variables, x, positions, segments)
  got = _decode_all(attn, variables, x, PLANS)
  chex.assert_trees_all_close(got, np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention_type", ["csa", "hca"])
def test_decode_shorter_than_one_compressed_entry_equals_the_full_forward(attention_type):
  """max_len < ratio: no compressed entry ever completes, so only the window attends (was a crash)."""
  attn = ATTENTION.get(attention_type)(cfg=tiny_model_cfg(attention={**DECODE, "csa_ratio": 64, "hca_ratio": 64}))
  x = np.random.default_rng(1).normal(size=(2, T, 32)).astype(np.float32)
  positions = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
  segments = np.ones((2, T), np.int32)
  variables = _init(attn, x, positions, segments, scale=10.0)
  want = jax.jit(attn.apply)(variables, x, positions, segments)
  chex.assert_trees_all_close(_decode_all(attn, variables, x, PLANS), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_ring_slots_hold_the_latest_positions():
  index_B = jnp.array([0, 3, 8, 13])
  got = cache.slot_positions(index_B, 8)
  want = [[-1] * 8, [0, 1, 2, -1, -1, -1, -1, -1], list(range(8)), [8, 9, 10, 11, 12, 5, 6, 7]]
  np.testing.assert_array_equal(got, want)
