"""Brute-force NumPy references for MoE routing and dispatch (float64, loops).

Written from the papers' definitions, independently of moejax's sorted and
padded implementation: per token, per expert, explicit Python loops.
"""

import numpy as np

SCORES = {
    "softmax": lambda l: np.exp(l - l.max()) / np.exp(l - l.max()).sum(),
    "sigmoid": lambda l: 1.0 / (1.0 + np.exp(-l)),
    "sqrtsoftplus": lambda l: np.sqrt(np.log1p(np.exp(l))),
}


def np_swiglu(x, w_gate, w_up, w_down, limit=0.0):
  g, u = x @ w_gate, x @ w_up
  if limit > 0:
    g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
  return (g / (1.0 + np.exp(-g)) * u) @ w_down


def np_route(x_NxD, token_ids_N, w_gate_DxE, moe, bias_E=None, table_VxK=None, router="topk"):
  """Per-token routing: lists of (expert, weight) per token, and probs [N, E]."""
  n, e = x_NxD.shape[0], w_gate_DxE.shape[1]
  logits = x_NxD.astype(np.float64) @ w_gate_DxE.astype(np.float64)
  scores = np.stack([SCORES[moe.score](logits[i]) for i in range(n)])
  choices = []
  if router == "expert_choice":
    cap = min(n, int(np.ceil(moe.capacity_factor * n * moe.top_k / e)))
    picked = [set(np.argsort(-scores[:, j], kind="stable")[:cap]) for j in range(e)]
    for i in range(n):
      choices.append([j for j in range(e) if i in picked[j]])
  for i in range(n if router != "expert_choice" else 0):
    if router == "hash":
      choices.append(list(table_VxK[token_ids_N[i]]))
      continue
    sel = scores[i] + (bias_E if bias_E is not None else 0.0)
    allowed = list(range(e))
    if moe.num_groups > 1:
      size = e // moe.num_groups
      group_score = [sum(sorted(sel[g * size:(g + 1) * size])[-2:]) for g in range(moe.num_groups)]
      best = sorted(range(moe.num_groups), key=lambda g: -group_score[g])[:moe.topk_groups]
      allowed = [j for j in range(e) if j // size in best]
    others = [j for j in range(e) if j not in allowed]  # fill a top-k larger than the kept groups
    choices.append((sorted(allowed, key=lambda j: -sel[j]) + sorted(others, key=lambda j: -sel[j]))[:moe.top_k])
  routes = []
  for i, experts in enumerate(choices):
    w = np.array([scores[i, j] for j in experts])
    if moe.renormalize and len(w):
      w = w / (w.sum() + 1e-20)
    routes.append(list(zip(experts, w * moe.routed_scale)))
  probs = scores if moe.score == "softmax" else scores / scores.sum(-1, keepdims=True)
  return routes, probs, logits


def np_dispatch(x_NxD, routes, experts, limit=0.0, cap=None):
  """``y[n] = sum over kept (e, w) of w * SwiGLU_e(x[n])``; with ``cap``, expert e
  keeps its first ``cap`` assignments in (slot k, token n) order.

  ``experts`` = (w_gate [E,D,F], w_up [E,D,F], w_down [E,F,D]). Returns (y, dropped).
  """
  n = x_NxD.shape[0]
  x = x_NxD.astype(np.float64)
  kept = set()
  if cap is None:
    kept = {(i, k) for i in range(n) for k in range(len(routes[i]))}
  else:
    filled = {}
    for k in range(max(len(r) for r in routes)):
      for i in range(n):
        if k < len(routes[i]):
          e = routes[i][k][0]
          if filled.get(e, 0) < cap:
            filled[e] = filled.get(e, 0) + 1
            kept.add((i, k))
  y = np.zeros_like(x)
  for i in range(n):
    for k, (e, w) in enumerate(routes[i]):
      if (i, k) in kept:
        y[i] += w * np_swiglu(x[i], *(np.asarray(a[e], np.float64) for a in experts), limit)
  total = sum(len(r) for r in routes)
  return y, total - len(kept)
