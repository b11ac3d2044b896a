"""Qwen3-MoE and Mixtral: GQA attention + softmax top-k MoE, mapped onto
``dense``/``sliding`` attention and the ``moe``/``dense`` MLP types.

Qwen3-MoE: per-head q/k RMSNorm (``attention.qk_norm``), ``norm_topk_prob``
(``moe.renormalize``), dense layers from ``mlp_only_layers`` /
``decoder_sparse_step`` (the ``mlp_types`` schedule, width
``intermediate_size``), sliding window on every layer with
``use_sliding_window``. Mixtral: softmax over the top-k logits (==
renormalised softmax top-k), ``sliding_window`` on every layer.
"""

from __future__ import annotations

from moejax.interop import layout
from moejax.interop.archs.registry import ARCHS, HFFields, common_hf, common_model, unsupported
from moejax.interop.archs.gqa import GQA, attention_types, field_value, mlp_types, window


class _GQAMoE(GQA):
  """Shared by Qwen3-MoE and Mixtral."""

  moe_prefix = "mlp"
  expert_names = ("gate_proj", "up_proj", "down_proj")
  mlp_kinds = frozenset({"dense", "moe"})

  def check_writable(self, m) -> None:
    what = f"{self.model_type} config.json"
    self.check_attention(m)
    types = set(mlp_types(m))
    if "moe" not in types or not types <= self.mlp_kinds:
      raise unsupported(what, "mlp_types", m.mlp_types, f"{self.model_type} layers are "
                        f"{' or '.join(sorted(self.mlp_kinds))} (with at least one 'moe').")
    for field, ok in (("moe.num_shared", m.moe.num_shared == 0), ("moe.score", m.moe.score == "softmax"),
                      ("moe.router", m.moe.router == "topk"), ("moe.score_bias", not m.moe.score_bias),
                      ("moe.num_groups", m.moe.num_groups == 1), ("moe.routed_scale", m.moe.routed_scale == 1.0),
                      ("moe.swiglu_limit", m.moe.swiglu_limit == 0)):
      if not ok:
        raise unsupported(what, field, field_value(m, field), f"{self.model_type} has no such option.")

  def tensors(self, m) -> list:
    out = layout.trunk(m)
    for i, mlp_type in enumerate(mlp_types(m)):
      p = f"model.layers.{i}"
      out += layout.dense_attention(f"layer_{i}/attention", f"{p}.self_attn", self.qk_norm)
      if mlp_type == "dense":
        out += layout.swiglu(f"layer_{i}/mlp", f"{p}.mlp")
        continue
      moe = f"{p}.{self.moe_prefix}"
      out.append(layout.param(f"layer_{i}/mlp/router/w_gate", f"{moe}.gate.weight", "linear"))
      out += layout.experts(f"layer_{i}/mlp", f"{moe}.experts", m.moe.num_experts, self.expert_names)
    return out


@ARCHS.register("qwen3_moe")
class Qwen3MoE(_GQAMoE):
  model_type, architecture, qk_norm = "qwen3_moe", "Qwen3MoeForCausalLM", True
  ignored = frozenset({"max_window_layers"})

  def model_config(self, f: HFFields) -> dict:
    model = common_model(f)
    sliding = bool(f("use_sliding_window", False))
    if not sliding:
      f.used.add("sliding_window")
    model.update(self.attention_model(f, window(f, sliding)))
    n, experts = model["num_layers"], f("num_experts", None) or f("num_local_experts")
    f.used.update({"num_experts", "num_local_experts"})
    dense, step = set(f("mlp_only_layers", [])), f("decoder_sparse_step", 1)
    model["mlp_types"] = tuple("moe" if i not in dense and experts > 0 and (i + 1) % step == 0 else "dense"
                               for i in range(n))
    model["ffn_dim"] = f("intermediate_size")
    model["moe"] = dict(num_experts=experts, top_k=f("num_experts_per_tok"), expert_ffn_dim=f("moe_intermediate_size"),
                        num_shared=0, score="softmax", renormalize=bool(f("norm_topk_prob", False)))
    return model

  def hf_config(self, m) -> dict:
    self.check_writable(m)
    types = mlp_types(m)
    sliding = "sliding" in attention_types(m)
    return dict(common_hf(m, self), **self.hf_attention(m), intermediate_size=m.ffn_dim,
                moe_intermediate_size=m.moe.expert_ffn_dim, num_experts=m.moe.num_experts,
                num_experts_per_tok=m.moe.top_k, norm_topk_prob=bool(m.moe.renormalize), decoder_sparse_step=1,
                mlp_only_layers=[i for i, t in enumerate(types) if t == "dense"], use_sliding_window=sliding,
                sliding_window=m.attention.window if sliding else None)


@ARCHS.register("mixtral")
class Mixtral(_GQAMoE):
  model_type, architecture = "mixtral", "MixtralForCausalLM"
  moe_prefix, expert_names, mlp_kinds = "block_sparse_moe", ("w1", "w3", "w2"), frozenset({"moe"})

  def model_config(self, f: HFFields) -> dict:
    model = common_model(f)
    model.update(self.attention_model(f, window(f, True)))
    f.training_only("router_jitter_noise")
    width = f("intermediate_size")
    model.update(mlp_types=("moe",), ffn_dim=width)
    model["moe"] = dict(num_experts=f("num_local_experts"), top_k=f("num_experts_per_tok"), expert_ffn_dim=width,
                        num_shared=0, score="softmax", renormalize=True)
    return model

  def check_writable(self, m) -> None:
    super().check_writable(m)
    if not m.moe.renormalize:
      raise unsupported("mixtral config.json", "moe.renormalize", False, "Mixtral renormalises its top-k weights.")
    if m.ffn_dim != m.moe.expert_ffn_dim:
      raise unsupported("mixtral config.json", "ffn_dim", m.ffn_dim, "set it to moe.expert_ffn_dim (unused by MoE).")

  def hf_config(self, m) -> dict:
    self.check_writable(m)
    sliding = "sliding" in attention_types(m)
    return dict(common_hf(m, self), **self.hf_attention(m), intermediate_size=m.moe.expert_ffn_dim,
                num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, router_jitter_noise=0.0,
                sliding_window=m.attention.window if sliding else None)
