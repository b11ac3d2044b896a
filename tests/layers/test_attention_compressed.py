"""DeepSeek-V4 swa/csa/hca against brute force: compressed entries built by a per-window
loop, attention as a masked softmax over [window keys + the selected compressed entries]."""

import chex
import numpy as np
import pytest

from moejax.layers.attention import ATTENTION
from tests.helpers import tiny_model_cfg
from tests.layers import attention_reference as ref
from tests.layers.test_attention import POSITIONS, SEGMENTS, SMALL, _init, _inputs, jitted_apply, yarn_inv_freq

SOWN = ["aux_loss", "metrics", "max_stats"]


def _rope_args(cfg, kind, dim):
  a = cfg.attention
  theta, yarn = (cfg.rope_theta, a.yarn) if kind == "swa" else (a.compress_rope_theta or cfg.rope_theta,
                                                                  a.compress_yarn)
  rot = dict(theta=theta, dim=a.rope_dim, layout=a.rope_layout, part="trailing")
  if yarn.factor > 1:
    rot["inv_freq"] = yarn_inv_freq(a.rope_dim or dim, theta, yarn.factor, yarn.original_max_len, yarn.beta_fast,
                                    yarn.beta_slow)
    rot["scale"] = yarn.attention_factor or 0.1 * np.log(yarn.factor) + 1
  return rot


def reference_entries(x, pc, pos, seg, ratio, dim, overlap, rot, eps):
  """Compressed entries of one row, one window at a time: (entries [N, dim], visible(t, w))."""
  kv, gate = x @ pc["w_kv"], x @ pc["w_gate"]
  entries, spans = [], []
  for w in range(len(x) // ratio):
    slots = []  # (kv, gate) per pooled slot, channel-wise
    if overlap and w > 0:  # series Ca of the previous window
      slots += [(kv[(w - 1) * ratio + j, :dim], gate[(w - 1) * ratio + j, :dim] + pc["position_bias"][j, :dim])
                for j in range(ratio)]
    cur = slice(dim, 2 * dim) if overlap else slice(0, dim)  # series Cb (or the only series)
    slots += [(kv[w * ratio + j, cur], gate[w * ratio + j, cur] + pc["position_bias"][j, cur]) for j in range(ratio)]
    values, gates = np.array([s[0] for s in slots]), np.array([s[1] for s in slots])
    weights = np.exp(gates - gates.max(0)) / np.exp(gates - gates.max(0)).sum(0)
    entry = ref.rms((weights * values).sum(0), pc["kv_norm"]["scale"], eps)
    entries.append(ref.rotate(entry[None], pos[w * ratio:w * ratio + 1], **rot)[0])
    spans.append(((w - 1) * ratio if overlap and w > 0 else w * ratio, (w + 1) * ratio - 1))

  def visible(t, w):
    first, last = spans[w]
    return last <= t and seg[first] == seg[last] == seg[t] and seg[t] > 0

  return np.array(entries).reshape(-1, dim), visible


def reference_v4(x, p, cfg, kind):
  """Output, max logit, KL mean and recall of DeepSeek-V4 attention, by brute force."""
  a = cfg.attention
  h, dh, g, eps = cfg.num_heads, cfg.d_model // cfg.num_heads, a.o_groups, cfg.norm_eps
  rot = _rope_args(cfg, kind, dh)
  scale = dh ** -0.5
  ratio = {"csa": a.csa_ratio, "hca": a.hca_ratio}.get(kind)
  out = np.zeros(x.shape)
  max_logit, kls, recalls = np.full(h, -np.inf), [], []
  rows = np.unique(np.linspace(0, x.shape[1] - 1, a.indexer_recall_queries).round().astype(int))
  for b in range(x.shape[0]):
    pos, seg = POSITIONS[b], SEGMENTS[b]
    q_resid = ref.rms(x[b] @ p["w_q_a"], p["q_a_norm"]["scale"], eps)
    q = ref.rotate(ref.rms(np.einsum("TR,RHK->THK", q_resid, p["w_q_b"]), None, eps), pos, **rot)
    kv = ref.rotate(ref.rms(x[b] @ p["w_kv"], p["kv_norm"]["scale"], eps), pos, **rot)
    entries, entry_visible = np.zeros((0, dh)), lambda t, w: False
    if ratio:
      entries, entry_visible = reference_entries(x[b], p["compressor"], pos, seg, ratio, dh, kind == "csa", rot, eps)
    if kind == "csa":
      pi = p["indexer"]
      rot_i = _rope_args(cfg, kind, a.index_head_dim)
      keys_i, _ = reference_entries(x[b], pi, pos, seg, ratio, a.index_head_dim, True, rot_i, eps)
      q_i = ref.rotate(np.einsum("TR,RJI->TJI", q_resid, pi["w_q_b"]), pos, **rot_i)
      w_i = x[b] @ pi["w_weights"] * (a.index_heads ** -0.5 * a.index_head_dim ** -0.5)
    for t in range(x.shape[1]):
      window = ref.visible_keys(t, seg, a.window)
      candidates = [w for w in range(len(entries)) if entry_visible(t, w)]
      picked = candidates
      if kind == "csa":
        scores = ref.indexer_scores(q_i[t], w_i[t], keys_i)
        if a.indexer_stage != "warmup":
          picked = ref.topk_indices(scores, candidates, a.index_topk)
        if t in rows and seg[t] > 0 and candidates:
          dense = [ref.softmax_attend(q[t, hh] @ entries[candidates].T * scale, entries[candidates])[1]
                   for hh in range(h)]
          chosen = ref.topk_indices(scores, candidates, a.index_topk)
          recalls.append(np.mean(dense, 0)[[candidates.index(w) for w in chosen]].sum())
      values = np.concatenate([kv[window], entries[picked]])
      mass = 0
      o = np.zeros((h, dh))
      for hh in range(h):
        logits = values @ q[t, hh] * scale
        o[hh], probs, _ = ref.softmax_attend(logits, values, p["sinks"][hh])
        mass = mass + probs[len(window):]
        max_logit[hh] = max(max_logit[hh], logits.max())
      if kind == "csa" and seg[t] > 0 and picked:
        kls.append(ref.kl(mass / mass.sum(), scores[picked]))
      o = ref.rotate(o[None], pos[t:t + 1], inverse=True, **rot)[0].reshape(g, -1)
      out[b, t] = sum(o[gg] @ p["w_o_a"][gg] @ p["w_o_b"][gg] for gg in range(g))
  return out, max_logit, np.mean(kls) if kls else None, np.mean(recalls) if recalls else None


@pytest.mark.parametrize("kind,options", [
    ("swa", {"rope_layout": "interleave", "rope_dim": 0, "window": 5}),
    ("hca", {"hca_ratio": 3, "window": 1, "compress_rope_theta": 160000.0}),
    ("csa", {"rope_layout": "interleave"}),
    ("csa", {"indexer_stage": "warmup", "index_topk": 2}),
    ("csa", {"indexer_stage": "off", "csa_ratio": 3, "index_topk": 1}),
    ("csa", {"compress_rope_theta": 160000.0, "compress_yarn": {"factor": 4.0, "original_max_len": 8,
                                                                "attention_factor": 1.0}}),
])
def test_v4_attention_matches_bruteforce(kind, options):
  cfg = tiny_model_cfg(attention={**SMALL, "track_max_logit": True, **options})
  attn = ATTENTION.get(kind)(cfg=cfg)
  x = _inputs()
  variables = _init(attn, x, scale=4.0)
  got, sown = jitted_apply(attn, SOWN)(variables, x, POSITIONS, SEGMENTS)
  expected, max_logit, kl, recall = reference_v4(x, ref.to64(variables["params"]), cfg, kind)
  valid = SEGMENTS > 0
  chex.assert_trees_all_close(np.asarray(got)[valid], expected[valid].astype(np.float32), rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(sown["max_stats"]["max_logit"][0], max_logit.astype(np.float32), rtol=1e-4)
  if kind == "csa":
    chex.assert_trees_all_close(sown["metrics"]["indexer_recall"][0], np.float32(recall), rtol=1e-4)
  if kind == "csa" and cfg.attention.indexer_stage != "off":
    chex.assert_trees_all_close(sown["aux_loss"]["indexer_kl"][0], np.float32(kl), rtol=1e-4, atol=1e-6)
  else:
    assert "aux_loss" not in sown
