"""Which past tokens / compressed blocks each query attends to, per attention layer, on a real input.

``selections(cfg, tokens_BxT)`` -> ``{"layer_i": bool [T, S]}`` for row 0:

* ``dense`` / ``mla``: every earlier token (``core.visible``);
* ``sliding`` / ``swa``: the query and its ``window - 1`` predecessors (``core.visible`` with the window);
* ``dsa``: the lightning indexer's ``index_topk`` best visible tokens (DeepSeek-V3.2), recomputed with the
  layer's own indexer outputs and ``indexer.top_k``;
* ``csa``: the ``index_topk`` best visible *compressed blocks* (S = T / csa_ratio; DeepSeek-V4), from the
  compressed indexer's outputs; ``hca``: every visible compressed block (S = T / hca_ratio).

The CSA/HCA maps show the compressed part only (V4 layers also attend a sliding window of raw tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import expand_schedule
from moejax.layers.attention import core, indexer
from moejax.models import build_model
from moejax.models.scan import plan_of, unrolled, unstack_collections


def selections(cfg, tokens_BxT, seed: int = 0, variables=None) -> dict[str, np.ndarray]:
  """See the module docstring; ``variables`` default to a fresh init from ``seed``."""
  m, a = cfg.model, cfg.model.attention
  plan = plan_of(m)  # model.scan_layers: read the layers unrolled (the same function, per-layer names)
  model = build_model(unrolled(m))
  if variables is not None:
    variables = unstack_collections(variables, plan)
  tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
  if variables is None:
    from flax.linen import meta

    variables = meta.unbox(model.init(jax.random.key(seed), tokens_BxT))
  variables = {k: v for k, v in variables.items() if k in ("params", "router_bias", "hash_table")}
  capture = lambda module, _: module.name in ("indexer", "compressor")
  _, sown = model.apply(variables, tokens_BxT, capture_intermediates=capture, mutable=True)
  inter = sown.get("intermediates", {})
  b, t = tokens_BxT.shape
  idx_T, seg_BxT = jnp.arange(t), jnp.ones((b, t), jnp.int32)
  out = {}
  for i, kind in enumerate(expand_schedule(m.attention_types, m.num_layers)):
    layer = inter.get(f"layer_{i}", {}).get("attention", {})
    if kind in ("dsa",):
      q, w, k = layer["indexer"]["__call__"][0]
      valid = core.visible(idx_T, idx_T, seg_BxT, seg_BxT)
      sel, ok = indexer.top_k(indexer.scores(q, w, k), valid, min(a.index_topk, t))
      out[f"layer_{i}"] = _mask(sel, ok, t)
    elif kind == "csa":
      q, w, entries = layer["indexer"]["__call__"][0]
      valid = entries.visible(idx_T[None], seg_BxT)
      n = entries.kv_BxZxDh.shape[1]
      sel, ok = indexer.top_k(indexer.scores(q, w, entries.kv_BxZxDh), valid, min(a.index_topk, n))
      out[f"layer_{i}"] = _mask(sel, ok, n)
    elif kind == "hca":
      entries = layer["compressor"]["__call__"][0]
      out[f"layer_{i}"] = np.asarray(entries.visible(idx_T[None], seg_BxT))[0]
    else:
      window = a.window if kind in ("sliding", "swa") else 0
      out[f"layer_{i}"] = np.asarray(core.visible(idx_T, idx_T, seg_BxT, seg_BxT, window))[0]
  return out


def _mask(sel_BxQxk, ok_BxQxk, s: int) -> np.ndarray:
  """bool [Q, S] of row 0: True at each selected (and valid) key."""
  sel, ok = np.asarray(sel_BxQxk)[0], np.asarray(ok_BxQxk)[0]
  out = np.zeros((sel.shape[0], s), bool)
  rows = np.repeat(np.arange(sel.shape[0]), sel.shape[1])
  out[rows[ok.ravel()], sel.ravel()[ok.ravel()]] = True
  return out
