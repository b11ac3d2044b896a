"""GLM-4-MoE: GQA attention (optional per-head q/k norms ``use_qk_norm``,
rotate-half RoPE on the leading ``partial_rotary_factor`` of each head) with
DeepSeek-V3's MoE: sigmoid scores, the selection bias
``e_score_correction_bias`` (collection ``router_bias``), ``n_group`` /
``topk_group`` group-limited top-k, ``norm_topk_prob``,
``routed_scaling_factor``, ``n_shared_experts``; the first
``first_k_dense_replace`` layers are dense SwiGLUs (``intermediate_size``).

This is the Hugging Face counterpart of moejax's DeepSeek-V3 routing on plain
GQA attention (``configs/tiny_moe.py``, recipes ``v3`` and ``no_bias``: the
latter is written with a zero selection bias, which selects exactly as no bias).
The checkpoints' MTP layers (``num_nextn_predict_layers``) are dropped with a notice.
"""

from __future__ import annotations

import numpy as np

from moejax.interop import layout
from moejax.interop.archs.registry import ARCHS, HFFields, common_hf, common_model, unsupported
from moejax.interop.archs.deepseek import moe_config, moe_hf, mtp_notice
from moejax.interop.archs.gqa import GQA, field_value, mlp_types, window


@ARCHS.register("glm4_moe")
class Glm4Moe(GQA):
  model_type, architecture = "glm4_moe", "Glm4MoeForCausalLM"
  qk_norm, partial_rope = None, True
  ignored = frozenset({"num_nextn_predict_layers"})

  def model_config(self, f: HFFields) -> dict:
    model = common_model(f)
    model.update(self.attention_model(f, window(f, False)))
    dense = f("first_k_dense_replace", 0)
    model.update(mlp_types=tuple("dense" if i < dense else "moe" for i in range(model["num_layers"])),
                 ffn_dim=f("intermediate_size"),
                 moe=dict(moe_config(f, "sigmoid"), num_groups=f("n_group", 1), topk_groups=f("topk_group", 1)))
    return model

  def check_writable(self, m) -> None:
    what = f"{self.model_type} config.json"
    self.check_attention(m)
    types = mlp_types(m)
    dense = [t == "dense" for t in types]
    if set(types) - {"dense", "moe"} or "moe" not in types or dense != sorted(dense, reverse=True):
      raise unsupported(what, "mlp_types", m.mlp_types, "GLM-4-MoE has dense layers first, then 'moe' layers.")
    for field, ok, fix in (("moe.score", m.moe.score == "sigmoid", "use 'sigmoid'"),
                           ("moe.router", m.moe.router == "topk", "use 'topk'"),
                           ("moe.num_shared", m.moe.num_shared >= 1, "GLM-4-MoE always has a shared expert: use >= 1"),
                           ("moe.swiglu_limit", m.moe.swiglu_limit == 0, "GLM-4-MoE has no clamp: use 0")):
      if not ok:
        raise unsupported(what, field, field_value(m, field), f"{fix} (or another --model-type).")

  def hf_config(self, m) -> dict:
    self.check_writable(m)
    dense = sum(t == "dense" for t in mlp_types(m))
    return dict(common_hf(m, self), **self.hf_attention(m), **moe_hf(m), intermediate_size=m.ffn_dim,
                first_k_dense_replace=dense, n_group=m.moe.num_groups, topk_group=m.moe.topk_groups,
                num_nextn_predict_layers=0)

  def tensors(self, m) -> list:
    out = layout.trunk(m)
    for i, mlp_type in enumerate(mlp_types(m)):
      p, ours = f"model.layers.{i}", f"layer_{i}"
      out += layout.dense_attention(f"{ours}/attention", f"{p}.self_attn", m.attention.qk_norm)
      if mlp_type == "dense":
        out += layout.swiglu(f"{ours}/mlp", f"{p}.mlp")
        continue
      out.append(layout.param(f"{ours}/mlp/router/w_gate", f"{p}.mlp.gate.weight", "linear"))
      out += layout.experts(f"{ours}/mlp", f"{p}.mlp.experts", m.moe.num_experts)
      out += layout.swiglu(f"{ours}/mlp/shared", f"{p}.mlp.shared_experts")
      if m.moe.score_bias:
        out += layout.moe_state(f"{ours}/mlp", f"{p}.mlp.gate", "e_score_correction_bias", None)
    return out

  def constant_tensors(self, m) -> dict:
    """Without ``moe.score_bias`` the selection bias is written as zeros (the same selection)."""
    if m.moe.score_bias:
      return {}
    zeros = np.zeros((m.moe.num_experts,), np.float32)
    return {f"model.layers.{i}.mlp.gate.e_score_correction_bias": zeros
            for i, t in enumerate(mlp_types(m)) if t == "moe"}

  def dropped(self, name, m):
    return mtp_notice(name, m)
