"""MLA and DSA against per-token brute force; absorbed == naive; the indexer's KL and recall."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.attention import ATTENTION
from tests.helpers import tiny_model_cfg
from tests.layers import attention_reference as ref
from tests.layers.test_attention import POSITIONS, SEGMENTS, SMALL, _init, _inputs, jitted_apply

SOWN = ["aux_loss", "metrics", "max_stats"]


def _layer(attention_type, **attention):
  cfg = tiny_model_cfg(attention={**SMALL, "track_max_logit": True, **attention})
  return ATTENTION.get(attention_type)(cfg=cfg), cfg


def mla_projections(x, p, pos, cfg):
  """Per-token MLA projections of one row: q_resid, q_nope, q_rope, k_nope, k_rope, v."""
  a = cfg.attention
  rot = dict(theta=cfg.rope_theta, layout=a.rope_layout)
  scale = 1.0
  if a.yarn.factor > 1:
    from moejax.layers.rope import Yarn
    y = Yarn.from_config(a.yarn)
    rot["inv_freq"], scale = y.frequencies(a.qk_rope_head_dim, cfg.rope_theta), y.cos_sin_scale()
  q_resid = None
  if a.q_lora_rank:
    q_resid = ref.rms(x @ p["w_q_a"], p["q_a_norm"]["scale"])
    q = np.einsum("TR,RHK->THK", q_resid, p["w_q_b"])
  else:
    q = np.einsum("TD,DHK->THK", x, p["w_q"])
  kv_a = x @ p["w_kv_a"]
  c = ref.rms(kv_a[:, :a.kv_lora_rank], p["kv_a_norm"]["scale"])
  k_rope = ref.rotate(kv_a[:, a.kv_lora_rank:], pos, scale=scale, **rot)
  kv = np.einsum("TR,RHK->THK", c, p["w_kv_b"])
  dn = a.qk_nope_head_dim
  return q_resid, q[..., :dn], ref.rotate(q[..., dn:], pos, scale=scale, **rot), kv[..., :dn], k_rope, kv[..., dn:]


def reference_mla(x, p, positions, segments, cfg, keys_of=None):
  """MLA output, max logit and per-(row, query, head) (logits, lse, keys) for the KL."""
  a = cfg.attention
  h = cfg.num_heads
  scale = (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5
  if a.yarn.factor > 1 and a.yarn.mscale_all_dim:
    scale *= (0.1 * a.yarn.mscale_all_dim * np.log(a.yarn.factor) + 1) ** 2
  out = np.zeros(x.shape[:2] + (h, a.v_head_dim))
  max_logit, attn = np.full(h, -np.inf), {}
  for b in range(x.shape[0]):
    _, q_nope, q_rope, k_nope, k_rope, v = mla_projections(x[b], p, positions[b], cfg)
    for t in range(x.shape[1]):
      keys = keys_of(b, t) if keys_of else ref.visible_keys(t, segments[b])
      for hh in range(h):
        logits = [(q_nope[t, hh] @ k_nope[s, hh] + q_rope[t, hh] @ k_rope[s]) * scale for s in keys]
        out[b, t, hh], _, lse = ref.softmax_attend(logits, v[keys, hh], p["sinks"][hh] if a.sinks else None)
        attn[b, t, hh] = (np.array(logits), lse, keys)
        max_logit[hh] = max(max_logit[hh], max(logits))
  return np.einsum("BTHV,HVD->BTD", out, p["w_o"]), max_logit, attn


def reference_index_scores(x, p, positions, cfg):
  """DeepSeek-V3.2 indexer scores [T, T] of one row (rope: leading channels, rotate-half)."""
  a = cfg.attention
  pi = p["indexer"]
  q_resid = mla_projections(x, p, positions, cfg)[0]
  rot = dict(theta=cfg.rope_theta, dim=a.qk_rope_head_dim, layout="half", part="leading")
  q = ref.rotate(np.einsum("TR,RJI->TJI", q_resid, pi["w_q_b"]), positions, **rot)
  k = ref.rotate(ref.layernorm(x @ pi["w_k"], pi["k_norm"]["scale"], pi["k_norm"]["bias"]), positions, **rot)
  w = x @ pi["w_weights"] * (a.index_heads ** -0.5 * a.index_head_dim ** -0.5)
  return np.stack([ref.indexer_scores(q[t], w[t], k) for t in range(len(x))])


@pytest.mark.parametrize("options", [
    {},
    {"q_lora_rank": 0, "rope_layout": "half", "sinks": False},
    {"rope_layout": "interleave", "yarn": {"factor": 4.0, "original_max_len": 8, "mscale": 1.0,
                                           "mscale_all_dim": 1.0}},
])
def test_mla_matches_bruteforce_and_absorbed_equals_naive(options):
  attn, cfg = _layer("mla", **options)
  x = _inputs()
  variables = _init(attn, x, scale=4.0)
  got, sown = jitted_apply(attn, SOWN)(variables, x, POSITIONS, SEGMENTS)
  absorbed, _ = jitted_apply(attn, SOWN, absorbed=True)(variables, x, POSITIONS, SEGMENTS)
  expected, max_logit, _ = reference_mla(x, ref.to64(variables["params"]), POSITIONS, SEGMENTS, cfg)
  valid = SEGMENTS > 0
  chex.assert_trees_all_close(np.asarray(got)[valid], expected[valid].astype(np.float32), rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(absorbed, got, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(sown["max_stats"]["max_logit"][0], max_logit.astype(np.float32), rtol=1e-4)


def _dsa_reference(x, variables, cfg, stage):
  """(output, max logit, KL mean, recall) of DSA by brute force."""
  a = cfg.attention
  p = ref.to64(variables["params"])
  scores = [reference_index_scores(x[b], p, POSITIONS[b], cfg) for b in range(2)]
  selected = lambda b, t: ref.topk_indices(scores[b][t], ref.visible_keys(t, SEGMENTS[b]), a.index_topk)
  dense = stage == "warmup"
  out, max_logit, attn = reference_mla(x, p, POSITIONS, SEGMENTS, cfg, keys_of=None if dense else selected)
  kls = []
  for b in range(2):
    for t in np.flatnonzero(SEGMENTS[b] > 0):
      logits_lse_keys = [attn[b, t, hh] for hh in range(cfg.num_heads)]
      keys = logits_lse_keys[0][2]
      mass = sum(np.exp(logits - lse) for logits, lse, _ in logits_lse_keys)
      kls.append(ref.kl(mass / mass.sum(), scores[b][t][keys]))
  rows = np.unique(np.linspace(0, 12, a.indexer_recall_queries).round().astype(int))
  recalls = []
  dense_attn = attn if dense else reference_mla(x, p, POSITIONS, SEGMENTS, cfg)[2]
  for b in range(2):
    for t in rows[SEGMENTS[b, rows] > 0]:
      probs = np.mean([np.exp(lg - np.log(np.exp(lg - lg.max()).sum()) - lg.max())
                       for lg, _, _ in (dense_attn[b, t, hh] for hh in range(cfg.num_heads))], axis=0)
      keys = ref.visible_keys(t, SEGMENTS[b])
      recalls.append(sum(probs[keys.index(s)] for s in selected(b, t)))
  return out, max_logit, np.mean(kls), np.mean(recalls)


@pytest.mark.parametrize("stage,topk", [("sparse", 3), ("warmup", 3), ("off", 13), ("sparse", 5)])
def test_dsa_matches_bruteforce_selection_kl_and_recall(stage, topk):
  """Attention over the brute-force indexer's top-k; KL and recall against NumPy."""
  attn, cfg = _layer("dsa", indexer_stage=stage, index_topk=topk)
  x = _inputs()
  variables = _init(attn, x, scale=4.0)
  got, sown = jitted_apply(attn, SOWN)(variables, x, POSITIONS, SEGMENTS)
  expected, max_logit, kl, recall = _dsa_reference(x, variables, cfg, stage)
  valid = SEGMENTS > 0
  chex.assert_trees_all_close(np.asarray(got)[valid], expected[valid].astype(np.float32), rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(sown["max_stats"]["max_logit"][0], max_logit.astype(np.float32), rtol=1e-4)
  chex.assert_trees_all_close(sown["metrics"]["indexer_recall"][0], np.float32(recall), rtol=1e-4)
  if stage == "off":
    assert "aux_loss" not in sown
  else:
    chex.assert_trees_all_close(sown["aux_loss"]["indexer_kl"][0], np.float32(kl), rtol=1e-4, atol=1e-6)
    assert float(sown["aux_loss"]["indexer_kl"][0]) > 1e-3  # far from a trivial 0


def test_dsa_with_topk_covering_every_key_is_dense_mla():
  dsa, _ = _layer("dsa", index_topk=13)
  mla, _ = _layer("mla")
  x = _inputs()
  variables = _init(dsa, x, scale=4.0)
  mla_params = {k: v for k, v in variables["params"].items() if k != "indexer"}
  chex.assert_trees_all_close(jitted_apply(dsa)(variables, x, POSITIONS, SEGMENTS),
                              jitted_apply(mla)({"params": mla_params}, x, POSITIONS, SEGMENTS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_type,stage", [("dsa", "warmup"), ("csa", "sparse")])
def test_indexer_learns_only_from_its_kl(attention_type, stage):
  """The KL reaches only indexer parameters; the LM path never reaches them."""
  attn, _ = _layer(attention_type, indexer_stage=stage)
  x = _inputs()
  variables = _init(attn, x, scale=4.0)

  def parts(params):
    y, sown = attn.apply({"params": params}, x, POSITIONS, SEGMENTS, mutable=["aux_loss"])
    return jnp.sum(y ** 2), sown["aux_loss"]["indexer_kl"][0]

  g_main, g_kl = jax.jit(lambda p: (jax.grad(lambda p: parts(p)[0])(p), jax.grad(lambda p: parts(p)[1])(p)))(
      variables["params"])
  for name, sub in variables["params"].items():
    main_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_main[name]))
    kl_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_kl[name]))
    if name == "indexer":
      assert main_norm == 0 and kl_norm > 0
    else:
      assert kl_norm == 0, name
