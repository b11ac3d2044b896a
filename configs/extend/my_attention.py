"""A user attention type in one file: soft-capped GQA attention that trains, decodes and is checked.

  moejax train --config configs/extend/my_attention.py --workdir workdirs/softcap
  moejax generate --config configs/extend/my_attention.py --workdir workdirs/softcap --prompt "import "

``softcap`` is grouped-query attention whose logits are squashed to
``cap * tanh(logits / cap)`` (Gemma 2's attention soft-capping; ``cap`` =
``model.attention.softcap``, a field this file adds). The class declares what
it supports (``moejax/layers/attention/registry.py``), so config validation,
QK-clip and context parallelism treat it like a built-in type, and its
``decode`` method (the cache helpers of ``moejax/layers/attention/cache.py``)
makes ``moejax generate`` work. docs/extending.md walks through it;
tests/test_extending.py trains it and generates from its checkpoint.
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import base_config
from moejax.layers.attention import cache, core, options
from moejax.layers.attention.registry import ATTENTION
from moejax.layers.rope import apply_rope


@ATTENTION.register("softcap")
class SoftcapAttention(nn.Module):
  """x_BxTxD -> y_BxTxD: GQA with ``softmax(cap * tanh(q k^T * scale / cap))`` over the previous keys."""

  rope_dim: ClassVar[bool] = True                            # reads model.attention.rope_dim
  qk_clip_params: ClassVar[tuple[str, str]] = ("w_q", "w_k")  # per-head projections QK-clip may rescale

  cfg: object  # the frozen model config

  @staticmethod
  def validate_config(cfg) -> list[str]:
    cap = cfg.model.attention.get("softcap")
    if cap is None:
      return ["model.attention.softcap is missing; softcap layers need it: set c.model.attention.softcap = 50.0 "
              "in get_config (configs/extend/my_attention.py)."]
    return [] if cap > 0 else [f"model.attention.softcap={cap} must be > 0 (Gemma 2 uses 50)."]

  def setup(self):
    cfg = self.cfg
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, options.head_dim(cfg)
    self.w_q = options.weight(self, "w_q", (d, h, dh), ("embed", "heads", "head_dim"))
    self.w_k = options.weight(self, "w_k", (d, k, dh), ("embed", "kv_heads", "head_dim"))
    self.w_v = options.weight(self, "w_v", (d, k, dh), ("embed", "kv_heads", "head_dim"))
    self.w_o = options.weight(self, "w_o", (h, dh, d), ("heads", "head_dim", "embed"))
    self.rope = options.main_rope(cfg, dim=cfg.attention.rope_dim)

  def project(self, x_BxTxD, positions_BxT):
    x = x_BxTxD.astype(self.w_q.dtype)
    q_BxTxHxDh = apply_rope(jnp.einsum("BTD,DHK->BTHK", x, self.w_q), positions_BxT, self.rope)
    k_BxTxKxDh = apply_rope(jnp.einsum("BTD,DHK->BTHK", x, self.w_k), positions_BxT, self.rope)
    return q_BxTxHxDh, k_BxTxKxDh, jnp.einsum("BTD,DHK->BTHK", x, self.w_v)

  def attend(self, q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, valid_BxTxS):
    """(y_BxTxD, max pre-cap logit per head float32 [H]); the softmax in float32."""
    cap, g = self.cfg.attention.softcap, q_BxTxHxDh.shape[2] // k_BxSxKxDh.shape[2]
    k_BxSxHxDh, v_BxSxHxDh = (jnp.repeat(x, g, axis=2) for x in (k_BxSxKxDh, v_BxSxKxDh))
    scale = q_BxTxHxDh.shape[-1] ** -0.5 * self.rope.softmax_scale
    logits_BxHxTxS = jnp.einsum("BTHD,BSHD->BHTS", q_BxTxHxDh, k_BxSxHxDh,
                                preferred_element_type=jnp.float32) * scale
    valid_Bx1xTxS = valid_BxTxS[:, None]
    max_logit_H = jnp.max(jnp.where(valid_Bx1xTxS, logits_BxHxTxS, core.NEG), axis=(0, 2, 3))
    capped = jnp.where(valid_Bx1xTxS, cap * jnp.tanh(logits_BxHxTxS / cap), core.NEG)
    probs_BxHxTxS = jax.nn.softmax(capped, axis=-1).astype(v_BxSxHxDh.dtype)
    out_BxTxHxDh = jnp.einsum("BHTS,BSHD->BTHD", probs_BxHxTxS, v_BxSxHxDh)
    return jnp.einsum("BTHK,HKD->BTD", out_BxTxHxDh, self.w_o), max_logit_H

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
    idx_T = jnp.arange(x_BxTxD.shape[1])
    y_BxTxD, max_logit_H = self.attend(*self.project(x_BxTxD, positions_BxT),
                                       core.visible(idx_T, idx_T, segment_ids_BxT, segment_ids_BxT))
    core.sow_max_logit(self, max_logit_H, self.cfg.attention.track_max_logit)  # what QK-clip reads
    return y_BxTxD

  @nn.compact
  def decode(self, x_BxCxD, positions_BxC, segment_ids_BxC, max_len: int):
    """A chunk of new tokens against the k/v cache ``k``, ``v`` [B, max_len, K, Dh]."""
    step = cache.begin(self, segment_ids_BxC)
    q_BxCxHxDh, k_BxCxKxDh, v_BxCxKxDh = self.project(x_BxCxD, positions_BxC)
    k_BxSxKxDh = cache.extend(self, "k", step, k_BxCxKxDh, max_len)
    v_BxSxKxDh = cache.extend(self, "v", step, v_BxCxKxDh, max_len)
    return self.attend(q_BxCxHxDh, k_BxSxKxDh, v_BxSxKxDh, cache.visible(step, max_len))[0]


def get_config(arg: str | None = None):
  c = base_config()
  c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=128,
                 attention_types=("softcap", "dense"))
  c.model.attention.softcap = 30.0  # the new type's option: a field of the schema from here on
  c.data.update(seq_len=64, stdlib_packages="json")
  c.train.update(steps=200, batch_size=8, log_every=10, eval_every=0, checkpoint_every=100)
  c.optim.update(learning_rate=3e-3, warmup_steps=10)
  return c
