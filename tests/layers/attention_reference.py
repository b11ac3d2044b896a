"""Brute-force NumPy (float64) references for the attention types.

Everything is spelled out per batch row, per query and per head with explicit
key lists; nothing here is shared with moejax's implementation.
"""

import numpy as np


def rotate(x, positions, theta, dim=0, layout="half", part="leading", inv_freq=None, scale=1.0, inverse=False):
  """RoPE by explicit 2x2 rotations of channel pairs. x: [T, ..., D], positions: [T]."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  rd = dim or d
  start = 0 if part == "leading" else d - rd
  out = x.copy()
  for i in range(rd // 2):
    a, b = (start + i, start + i + rd // 2) if layout == "half" else (start + 2 * i, start + 2 * i + 1)
    freq = theta ** (-2.0 * i / rd) if inv_freq is None else inv_freq[i]
    angle = np.asarray(positions, np.float64) * freq
    c = (np.cos(angle) * scale).reshape((-1,) + (1,) * (x.ndim - 2))
    s = (np.sin(angle) * scale * (-1 if inverse else 1)).reshape((-1,) + (1,) * (x.ndim - 2))
    out[..., a] = x[..., a] * c - x[..., b] * s
    out[..., b] = x[..., b] * c + x[..., a] * s
  return out


def rms(x, scale=None, eps=1e-6):
  x = np.asarray(x, np.float64)
  y = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
  return y if scale is None else y * scale


def layernorm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def visible_keys(t, seg, window=0):
  """Keys query t may see: causal, same document, padding sees itself, within the window."""
  return [s for s in range(t + 1)
          if seg[s] == seg[t] and (seg[t] > 0 or s == t) and (not window or t - s < window)]


def softmax_attend(logits, values, sink=None):
  """(out, probabilities, log-sum-exp) of one query over an explicit key list."""
  logits = np.asarray(logits, np.float64)
  all_logits = np.append(logits, sink) if sink is not None else logits
  top = all_logits.max()
  lse = top + np.log(np.exp(all_logits - top).sum())
  p = np.exp(logits - lse)
  return p @ np.asarray(values, np.float64).reshape(len(logits), -1), p, lse


def topk_indices(scores, candidates, k):
  """The k best candidates by score, ties to the lower index (lax.top_k's rule)."""
  ranked = sorted(candidates, key=lambda c: (-scores[c], c))
  return sorted(ranked[:k])


def indexer_scores(q_JxI, w_J, keys_SxI):
  """sum_j w_j relu(q_j . k_s) for every key."""
  return np.array([sum(w_J[j] * max(q_JxI[j] @ k, 0.0) for j in range(len(w_J))) for k in keys_SxI])


def kl(p, index_scores):
  """KL(p || softmax(index_scores)), p already normalised."""
  log_q = index_scores - np.log(np.exp(index_scores - index_scores.max()).sum()) - index_scores.max()
  keep = p > 0
  return float(np.sum(p[keep] * (np.log(p[keep]) - log_q[keep])))


def to64(tree):
  import jax

  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
