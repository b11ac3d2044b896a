"""Model FLOPs per token from the config, and model FLOPs utilisation (MFU).

Counted: matrix multiplies, 2 FLOPs per multiply-add. Everything elementwise
(norms, softmax, rope, activations, Sinkhorn) is left out, as in the usual
MFU accounting (PaLM, Appendix B), so the count is what the model needs, not
what a kernel happens to spend.

* **Weights** (every matrix a token passes through once): ``2 * size`` per
  token, read from the parameter shapes (``jax.eval_shape`` of ``init``, so
  a user's registered layer is counted too). Routed experts count ``top_k /
  num_experts`` of their weights (the experts a token is sent to); the
  embedding table is a lookup (0) and the output head ``2 D V`` per token
  for the main head and again for each MTP depth.
* **Attention** (scores ``q . k`` and the weighted sum of values, per query
  and visible key): ``2 H (Dqk + Dv)``, times the keys the type really
  attends: dense / mla: all previous keys (causal: position ``t`` sees
  ``t + 1`` keys, so the mean over a row of ``T`` is ``(T + 1) / 2``: the
  causal halving); sliding / swa: ``min(t + 1, window)``; dsa: the indexer
  scores every previous key (``2 J I`` each) and attention runs over
  ``min(t + 1, index_topk)``; csa: the window plus ``min(entries, index_topk)``
  compressed entries, the indexer scoring every visible entry; hca: the window
  plus every visible entry (``(t + 1) // ratio``).
* **Training** = forward + backward = 3 x forward. Rematerialisation
  recomputes the forward of each ``remat=full`` block once more; it is
  reported separately (``remat_recompute``) and never counted in MFU.

MFU = model training FLOPs per token x tokens per second / (devices x peak
FLOP/s per device); :func:`peak_flops` knows the bf16 dense peak of current
TPUs and NVIDIA GPUs (``train.peak_flops`` overrides it); on a CPU it is
unknown and MFU is not reported.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moejax.config import expand_schedule
from moejax.models import build_model
from moejax.models.scan import unrolled

# bf16 dense peak FLOP/s per chip / GPU (vendor datasheets; sparsity not counted).
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
    "a100": 312e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12,
}
_NOT_MATMUL = ("position_bias", "sinks", "base", "scale")  # leaves used elementwise, not as matrices
_EXPERT_WEIGHTS = ("w_up", "w_gate", "w_down")


@dataclasses.dataclass(frozen=True)
class Flops:
  """Model FLOPs per token (forward), by part, for one config and sequence length."""

  weights: float          # 2 x the matrices a token passes through (routed experts: top_k / E of them)
  attention: float        # scores and values over the visible keys, mean over the row's positions
  head: float             # output head(s): main + one per MTP depth
  remat_fraction: float   # share of the forward recomputed by remat=full blocks
  by_layer: dict          # {"layer_0 (dense, moe)": forward FLOPs per token of that block}

  @property
  def forward(self) -> float:
    return self.weights + self.attention + self.head

  @property
  def train(self) -> float:
    """Forward + backward (3 x forward), without rematerialisation."""
    return 3 * self.forward

  @property
  def remat_recompute(self) -> float:
    """Extra forward FLOPs per token that remat spends (not model FLOPs)."""
    return self.remat_fraction * self.forward


def visible_keys(seq_len: int, window: int = 0, ratio: int = 1, topk: int = 0) -> float:
  """Mean over positions t < seq_len of the keys query t attends: ``(t + 1) // ratio`` capped by
  ``window`` (0: none) and ``topk`` (0: none), i.e. causal attention over one packed row."""
  seen = (np.arange(seq_len) + 1) // ratio
  if window:
    seen = np.minimum(seen, window)
  if topk:
    seen = np.minimum(seen, topk)
  return float(seen.mean())


def attention_flops(model_cfg, attention_type: str, seq_len: int) -> float:
  """Forward score + value FLOPs per token of one layer of ``attention_type`` (see module doc)."""
  m, a = model_cfg, model_cfg.attention
  h, dh = m.num_heads, m.head_dim or m.d_model // m.num_heads
  per_key_mla = 2 * h * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
  indexer = 2 * a.index_heads * a.index_head_dim
  v4 = 4 * h * dh  # one shared key = value vector per token / entry
  counts = {
      "dense": lambda: 4 * h * dh * visible_keys(seq_len),
      "sliding": lambda: 4 * h * dh * visible_keys(seq_len, window=a.window),
      "mla": lambda: per_key_mla * visible_keys(seq_len),
      "dsa": lambda: indexer * visible_keys(seq_len) + per_key_mla * visible_keys(seq_len, topk=a.index_topk),
      "swa": lambda: v4 * visible_keys(seq_len, window=a.window),
      "csa": lambda: (v4 * (visible_keys(seq_len, window=a.window)
                            + visible_keys(seq_len, ratio=a.csa_ratio, topk=a.index_topk))
                      + indexer * visible_keys(seq_len, ratio=a.csa_ratio)),
      "hca": lambda: v4 * (visible_keys(seq_len, window=a.window) + visible_keys(seq_len, ratio=a.hca_ratio)),
  }
  if attention_type not in counts:
    raise KeyError(f"no FLOP count for attention type {attention_type!r} (counted: {', '.join(counts)}); add "
                   "its count to moejax/flops.py:attention_flops")
  return counts[attention_type]()


def model_flops(model_cfg, seq_len: int) -> Flops:
  """:class:`Flops` of ``model_cfg`` (the ``model`` section) for rows of ``seq_len`` tokens."""
  model = build_model(unrolled(model_cfg))  # per-layer names, also under model.scan_layers
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  moe = model_cfg.moe
  expert_share = moe.top_k / moe.num_experts
  per_module: dict[str, float] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes))[0]:
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names[-1] in _NOT_MATMUL or leaf.ndim < 2 or names[0] in ("embed", "lm_head"):
      continue
    share = expert_share if names[-1] in _EXPERT_WEIGHTS and names[-2] == "mlp" and leaf.ndim == 3 else 1.0
    per_module[names[0]] = per_module.get(names[0], 0.0) + 2.0 * float(np.prod(leaf.shape)) * share

  attention_types = expand_schedule(model_cfg.attention_types, model_cfg.num_layers)
  mlp_types = expand_schedule(model_cfg.mlp_types, model_cfg.num_layers)
  by_layer, attention = {}, 0.0
  remat = expand_schedule(model_cfg.remat, model_cfg.num_layers)
  recomputed = 0.0
  for i, (att, mlp) in enumerate(zip(attention_types, mlp_types)):
    flops = per_module.pop(f"layer_{i}", 0.0) + attention_flops(model_cfg, att, seq_len)
    attention += attention_flops(model_cfg, att, seq_len)
    by_layer[f"layer_{i} ({att}, {mlp})"] = flops
    recomputed += flops if remat[i] == "full" else 0.0
  for k in range(model_cfg.mtp.depth):
    att = model_cfg.mtp.attention_type
    attention += attention_flops(model_cfg, att, seq_len)
    by_layer[f"mtp_{k + 1} ({att}, {model_cfg.mtp.mlp_type})"] = (per_module.pop(f"mtp_{k + 1}", 0.0)
                                                                   + attention_flops(model_cfg, att, seq_len))
  weights = sum(by_layer.values()) - attention + sum(per_module.values())  # + hc_head and other top-level matrices
  head = 2.0 * model_cfg.d_model * model_cfg.vocab_size * (1 + model_cfg.mtp.depth)
  forward = weights + attention + head
  return Flops(weights=weights, attention=attention, head=head, remat_fraction=recomputed / forward,
               by_layer=by_layer)


def peak_flops(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of one device of ``device_kind`` (``jax.devices()[0].device_kind``), or None."""
  kind = device_kind.lower()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
    if name in kind:
      return PEAK_FLOPS[name]
  return None


def mfu(train_flops_per_token: float, tokens_per_s: float, num_devices: int, peak_per_device: float) -> float:
  """Model FLOPs utilisation: achieved model training FLOP/s over the devices' peak."""
  return train_flops_per_token * tokens_per_s / (num_devices * peak_per_device)
