"""Dense and sliding attention against brute force; properties every attention type must have."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.attention import ATTENTION, core
from moejax.layers.rope import Yarn
from tests.helpers import tiny_model_cfg
from tests.layers import attention_reference as ref

ALL_TYPES = ("dense", "sliding", "mla", "dsa", "swa", "csa", "hca")

# Small enough for brute force, big enough that every branch is exercised:
# several windows, compressed entries, top-k < number of candidates.
SMALL = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
             window=3, csa_ratio=2, hca_ratio=4, index_heads=2, index_head_dim=8, index_topk=3,
             o_groups=2, o_lora_rank=8, rope_dim=4, sinks=True, chunk_size=8, indexer_recall_queries=4)

# Row 0: one document; row 1: two packed documents, then padding.
SEGMENTS = np.array([[1] * 13, [1] * 5 + [2] * 6 + [0] * 2], np.int32)
POSITIONS = np.array([list(range(13)), list(range(5)) + list(range(6)) + [0, 0]], np.int32)


def _layer(attention_type, **attention):
  cfg = tiny_model_cfg(attention=attention)
  return ATTENTION.get(attention_type)(cfg=cfg), cfg


def _inputs(t=13, seed=0, d=32):
  return np.random.default_rng(seed).normal(size=(2, t, d)).astype(np.float32)


def _init(attn, x, positions=POSITIONS, segments=SEGMENTS, scale=1.0):
  """Random parameters of the layer's shapes (no init compile): matrices normal(0.02 * scale),
  norm scales 1 + noise, and random sinks and biases so that each of them is tested.

  Larger ``scale`` makes the softmax far from uniform, so masking errors show.
  """
  shapes = nn.meta.unbox(jax.eval_shape(attn.init, jax.random.key(0), x, positions, segments)["params"])
  rng = np.random.default_rng(7)

  def sample(path, leaf):
    name, noise = str(path[-1].key), rng.normal(size=leaf.shape)
    w = 1 + 0.5 * noise if name == "scale" else 0.5 * noise if name in ("bias", "sinks", "position_bias") \
        else 0.02 * scale * noise
    return jnp.asarray(w, leaf.dtype)

  return {"params": jax.tree_util.tree_map_with_path(sample, shapes)}


def jitted_apply(attn, mutable=(), **kwargs):
  """One compiled ``attn.apply(variables, x, positions, segments)`` for repeated calls."""
  return jax.jit(lambda v, x, pos, seg: attn.apply(v, x, pos, seg, mutable=list(mutable) or False, **kwargs))


def yarn_inv_freq(dim, theta, factor, original, beta_fast, beta_slow):
  """YaRN (Peng et al., 2023, eq. 17-19) with DeepSeek's truncated correction range."""
  corr = lambda rotations: dim * np.log(original / (rotations * 2 * np.pi)) / (2 * np.log(theta))
  low, high = max(np.floor(corr(beta_fast)), 0), min(np.ceil(corr(beta_slow)), dim - 1)
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  return theta ** (-np.arange(0, dim, 2) / dim) * (ramp / factor + 1 - ramp)


def reference_dense(x, p, positions, segments, cfg, window):
  """Per batch row, head and query; the mask is spelled out key by key."""
  a = cfg.attention
  h, kv, dh = cfg.num_heads, cfg.num_kv_heads, p["w_q"].shape[-1]
  rot = dict(theta=cfg.rope_theta, dim=a.rope_dim, layout=a.rope_layout)
  scale = dh ** -0.5
  if a.yarn.factor > 1:
    y = Yarn.from_config(a.yarn)
    rot["inv_freq"] = yarn_inv_freq(a.rope_dim or dh, cfg.rope_theta, y.factor, y.original_max_len, y.beta_fast,
                                    y.beta_slow)
    rot["scale"] = 0.1 * np.log(y.factor) + 1
    scale *= (0.1 * y.mscale_all_dim * np.log(y.factor) + 1) ** 2 if y.mscale_all_dim else 1
  out = np.zeros(x.shape[:2] + (h, dh))
  max_logit = np.full(h, -np.inf)
  for b in range(x.shape[0]):
    q, k, v = (np.einsum("TD,DHK->THK", x[b], p[n]) for n in ("w_q", "w_k", "w_v"))
    if a.qk_norm:
      q, k = ref.rms(q, p["q_norm"]["scale"]), ref.rms(k, p["k_norm"]["scale"])
    q, k = ref.rotate(q, positions[b], **rot), ref.rotate(k, positions[b], **rot)
    for hh in range(h):
      for t in range(x.shape[1]):
        keys = ref.visible_keys(t, segments[b], window)
        sink = p["sinks"][hh] if a.sinks else None
        logits = [q[t, hh] @ k[s, hh // (h // kv)] * scale for s in keys]
        out[b, t, hh] = ref.softmax_attend(logits, v[keys, hh // (h // kv)], sink)[0]
        max_logit[hh] = max(max_logit[hh], max(logits))
  return np.einsum("BTHK,HKD->BTD", out, p["w_o"]), max_logit


@pytest.mark.parametrize("attention_type,heads,implementation,options", [
    ("dense", (4, 4), "xla", {}),
    ("dense", (4, 2), "chunked", {}),
    ("dense", (4, 1), "xla", {"sinks": True}),
    ("dense", (4, 1), "chunked", {"sinks": True}),
    ("dense", (4, 2), "chunked", {"rope_dim": 4}),
    ("dense", (4, 2), "xla", {"rope_dim": 4, "rope_layout": "interleave", "qk_norm": True}),
    ("dense", (4, 2), "chunked", {"yarn": {"factor": 8.0, "original_max_len": 64, "mscale_all_dim": 1.0}}),
    ("sliding", (4, 2), "chunked", {"window": 3, "sinks": True}),
    ("sliding", (4, 2), "xla", {"window": 3}),
    ("sliding", (4, 2), "chunked", {"window": 1}),
])
def test_dense_and_sliding_match_bruteforce(attention_type, heads, implementation, options):
  cfg = tiny_model_cfg(num_heads=heads[0], num_kv_heads=heads[1],
                       attention=dict(options, implementation=implementation, chunk_size=4, track_max_logit=True))
  attn = ATTENTION.get(attention_type)(cfg=cfg)
  x = _inputs()
  variables = _init(attn, x, scale=8.0)
  got, sown = jitted_apply(attn, ["max_stats"])(variables, x, POSITIONS, SEGMENTS)
  window = cfg.attention.window if attention_type == "sliding" else 0
  expected, max_logit = reference_dense(x, ref.to64(variables["params"]), POSITIONS, SEGMENTS, cfg, window)
  valid = SEGMENTS > 0
  chex.assert_trees_all_close(np.asarray(got)[valid], expected[valid].astype(np.float32), rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(sown["max_stats"]["max_logit"][0], max_logit.astype(np.float32), rtol=1e-4)


@pytest.mark.parametrize("window", [0, 5])
def test_flash_kernel_matches_explicit_softmax_including_gradients(window):
  """Outputs, lse and every gradient (through both outputs) of the custom-VJP kernel."""
  rng = np.random.default_rng(0)
  b, t, h, kv, d, e = 2, 37, 4, 2, 8, 6
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, e)))
  seg = jnp.asarray([[1] * 37, [1] * 10 + [2] * 20 + [0] * 7], jnp.int32)
  w_out, w_lse = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, h, e), (b, t, h)))

  def explicit(q, k, v):
    idx = jnp.arange(t)
    vis = core.visible(idx, idx, seg, seg, window)[:, None]
    s = jnp.einsum("BTHD,BSHD->BHTS", q, jnp.repeat(k, h // kv, axis=2)) * 0.3
    s = jnp.where(vis, s, -jnp.inf)
    out = jnp.einsum("BHTS,BSHE->BTHE", jax.nn.softmax(s, -1), jnp.repeat(v, h // kv, axis=2))
    return out, jnp.moveaxis(jax.nn.logsumexp(s, -1), 1, 2)

  def loss(fn):
    return lambda *a: sum(jnp.sum(o * w) for o, w in zip(fn(*a)[:2], (w_out, w_lse)))

  expected = jax.jit(lambda *a: (explicit(*a), jax.grad(loss(explicit), argnums=(0, 1, 2))(*a)))(q, k, v)
  for block in (8, 16):  # several blocks, the last one partial
    flash = lambda q, k, v: core.flash_attention(q, k, v, seg, scale=0.3, window=window, block=block)
    got = jax.jit(lambda *a: (flash(*a)[:2], jax.grad(loss(flash), argnums=(0, 1, 2))(*a)))(q, k, v)
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5)


def _all_type_cfg(attention_type, **extra):
  return _layer(attention_type, **{**SMALL, **extra})


@pytest.mark.parametrize("attention_type", ALL_TYPES)
def test_causal_and_packed_documents_never_see_each_other(attention_type):
  """Changing a token never changes earlier outputs, nor outputs of another packed document."""
  attn, _ = _all_type_cfg(attention_type)
  changed_at = (1, 4, 7, 8, 15)  # window and compression boundaries (m = 2 and 4)
  # Rows 0-5: one document; row 0 as is, row i with token changed_at[i-1] changed.
  # Rows 6-7: two packed documents and padding; row 7 with the first document changed.
  x = np.repeat(_inputs(16)[:1], 8, axis=0)
  for row, t in enumerate(changed_at, 1):
    x[row, t] += 3.0
  x[7, :7] += 3.0
  seg = np.array([[1] * 16] * 6 + [[1] * 7 + [2] * 7 + [0] * 2] * 2, np.int32)
  pos = np.array([list(range(16))] * 6 + [list(range(7)) + list(range(7)) + [0, 0]] * 2, np.int32)
  variables = _init(attn, x, pos, seg, scale=4.0)
  out = np.asarray(jitted_apply(attn)(variables, x, pos, seg))
  for row, t in enumerate(changed_at, 1):
    np.testing.assert_array_equal(out[row, :t], out[0, :t], err_msg=f"t={t}")
    assert not np.allclose(out[row, t], out[0, t])
  np.testing.assert_array_equal(out[7, 7:14], out[6, 7:14])
  assert not np.allclose(out[7, :7], out[6, :7])


@pytest.mark.parametrize("attention_type,change", [
    ("sliding", {"implementation": "xla"}), ("mla", {"implementation": "xla"}),
    ("dsa", {"chunk_size": 64}), ("hca", {"chunk_size": 64}), ("csa", {"chunk_size": 64}),
])
def test_chunked_equals_unchunked(attention_type, change):
  """Chunk size 8 (several query/key blocks) against one block or the XLA kernel."""
  chunked, _ = _all_type_cfg(attention_type, implementation="chunked", chunk_size=8, track_max_logit=True)
  whole, _ = _all_type_cfg(attention_type, **{"implementation": "chunked", "track_max_logit": True, **change})
  x = _inputs(13)
  variables = _init(chunked, x, scale=4.0)
  sown = ["aux_loss", "metrics", "max_stats"]
  y1, s1 = jitted_apply(chunked, sown)(variables, x, POSITIONS, SEGMENTS)
  y2, s2 = jitted_apply(whole, sown)(variables, x, POSITIONS, SEGMENTS)
  chex.assert_trees_all_close(y1, y2, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s1, s2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention_type", ALL_TYPES)
def test_max_logit_contract(attention_type):
  """QK-clip: float32 [H] in max_stats/max_logit when tracked, nothing otherwise (values: brute-force tests)."""
  attn, cfg = _all_type_cfg(attention_type, track_max_logit=True)
  x = _inputs(13)
  variables = _init(attn, x, scale=4.0)
  _, sown = jax.eval_shape(jitted_apply(attn, ["max_stats"]), variables, x, POSITIONS, SEGMENTS)
  (got,) = sown["max_stats"]["max_logit"]
  assert got.shape == (cfg.num_heads,) and got.dtype == jnp.float32
  untracked, _ = _all_type_cfg(attention_type)
  assert not jax.eval_shape(jitted_apply(untracked, ["max_stats"]), variables, x, POSITIONS, SEGMENTS)[1]


@pytest.mark.parametrize("attention_type", ["dense", "sliding", "dsa", "csa", "hca"])
def test_gradients_are_finite_at_long_context(attention_type):
  attn, _ = _layer(attention_type, **{**SMALL, "implementation": "chunked", "chunk_size": 256, "window": 64,
                                      "csa_ratio": 4, "hca_ratio": 64, "index_topk": 16})
  t = 2048
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, t, 32)), jnp.float32)
  pos, seg = jnp.arange(t)[None], jnp.ones((1, t), jnp.int32)
  params = _init(attn, x[:, :64], pos[:, :64], seg[:, :64])["params"]

  def loss(params, x):
    y, sown = attn.apply({"params": params}, x, pos, seg, mutable=["aux_loss"])
    return jnp.mean(y ** 2) + sum(jnp.sum(v) for v in jax.tree.leaves(sown))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads[1]).sum()) > 0


def _largest_buffer(hlo_text: str) -> int:
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"\w+\[([\d,]+)\]", hlo_text)]
  return max(sizes)


@pytest.mark.parametrize("attention_type", ["dense", "dsa", "csa", "hca"])
def test_long_context_forward_and_backward_never_hold_a_t_by_t_buffer(attention_type):
  """Compiled HLO of fwd+bwd at T = 8192 (chunked path): no buffer anywhere near T*T elements."""
  attn, _ = _layer(attention_type, **{**SMALL, "implementation": "chunked", "chunk_size": 512, "window": 128,
                                      "csa_ratio": 4, "hca_ratio": 128, "index_topk": 64})
  t = 8192
  x = jax.ShapeDtypeStruct((1, t, 32), jnp.float32)
  pos = seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  params = _init(attn, np.zeros((1, 16, 32), np.float32), np.zeros((1, 16), np.int32), np.ones((1, 16), np.int32))
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params["params"])
  loss = lambda p, x, pos, seg: jnp.sum(attn.apply({"params": p}, x, pos, seg, mutable=["aux_loss"])[0])
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, pos, seg).compile().as_text()
  assert _largest_buffer(hlo) < t * t // 8, _largest_buffer(hlo)
