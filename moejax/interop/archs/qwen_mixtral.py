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

from moejax.config import expand_schedule
from moejax.interop import layout
from moejax.interop.archs.registry import (ARCHS, Arch, HFFields, common_hf, common_model, read_rope, unsupported,
                                           write_rope)


def _attention_types(m) -> tuple[str, ...]:
  return tuple(expand_schedule(m.attention_types, m.num_layers))


def _window(f: HFFields, enabled: bool) -> dict:
  window = f("sliding_window", None) if enabled else None
  return dict(attention_types=("sliding",) if window else ("dense",), window=window or 128)


class _GQAMoE(Arch):
  """Shared by Qwen3-MoE and Mixtral."""

  moe_prefix = "mlp"
  expert_names = ("gate_proj", "up_proj", "down_proj")
  qk_norm = False

  def claims(self, m) -> bool:
    return set(_attention_types(m)) <= {"dense", "sliding"} and m.attention.qk_norm == self.qk_norm

  def attention_model(self, f: HFFields, window: dict) -> dict:
    theta, yarn = read_rope(f)
    f.expect("attention_bias", (False,), False)
    model = dict(num_kv_heads=f("num_key_value_heads"), head_dim=f("head_dim", 0), rope_theta=theta,
                 attention_types=window["attention_types"])
    attention = dict(qk_norm=self.qk_norm, window=window["window"], rope_layout="half")
    if yarn:
      attention["yarn"] = yarn
    return dict(model, attention=attention)

  def check_writable(self, m) -> None:
    what = f"{self.model_type} config.json"
    types = set(_attention_types(m))
    if len(types) != 1:
      raise unsupported(what, "attention_types", m.attention_types, "HF applies one attention kind to all layers.")
    for field, ok in (("attention.sinks", not m.attention.sinks), ("attention.rope_dim", m.attention.rope_dim == 0),
                      ("hc.streams", m.hc.streams == 1),
                      ("moe.num_shared", m.moe.num_shared == 0), ("moe.score", m.moe.score == "softmax"),
                      ("moe.router", m.moe.router == "topk"), ("moe.score_bias", not m.moe.score_bias),
                      ("moe.num_groups", m.moe.num_groups == 1), ("moe.routed_scale", m.moe.routed_scale == 1.0),
                      ("moe.swiglu_limit", m.moe.swiglu_limit == 0)):
      if not ok:
        value = m
        for part in field.split("."):
          value = value[part]
        raise unsupported(what, field, value, f"{self.model_type} has no such option.")

  def hf_attention(self, m) -> dict:
    head = {"head_dim": m.head_dim} if m.head_dim else {}  # absent: hidden_size // num_heads, as in moejax
    return dict(num_key_value_heads=m.num_kv_heads, **head,
                rope_parameters=write_rope(m.rope_theta, m.attention.yarn), attention_bias=False,
                attention_dropout=0.0, max_position_embeddings=max(4096, m.attention.yarn.original_max_len))

  def tensors(self, m) -> list:
    out = layout.trunk(m)
    for i, mlp_type in enumerate(expand_schedule(m.mlp_types, m.num_layers)):
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
    model.update(self.attention_model(f, _window(f, sliding)))
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
    types = expand_schedule(m.mlp_types, m.num_layers)
    sliding = _attention_types(m)[0] == "sliding"
    return dict(common_hf(m, self), **self.hf_attention(m), intermediate_size=m.ffn_dim,
                moe_intermediate_size=m.moe.expert_ffn_dim, num_experts=m.moe.num_experts,
                num_experts_per_tok=m.moe.top_k, norm_topk_prob=bool(m.moe.renormalize), decoder_sparse_step=1,
                mlp_only_layers=[i for i, t in enumerate(types) if t == "dense"], use_sliding_window=sliding,
                sliding_window=m.attention.window if sliding else None)


@ARCHS.register("mixtral")
class Mixtral(_GQAMoE):
  model_type, architecture = "mixtral", "MixtralForCausalLM"
  moe_prefix, expert_names = "block_sparse_moe", ("w1", "w3", "w2")

  def claims(self, m) -> bool:
    return super().claims(m) and set(expand_schedule(m.mlp_types, m.num_layers)) == {"moe"}

  def model_config(self, f: HFFields) -> dict:
    model = common_model(f)
    model.update(self.attention_model(f, _window(f, True)))
    f.expect("router_jitter_noise", (0, 0.0), 0.0)
    width = f("intermediate_size")
    model.update(mlp_types=("moe",), ffn_dim=width)
    model["moe"] = dict(num_experts=f("num_local_experts"), top_k=f("num_experts_per_tok"), expert_ffn_dim=width,
                        num_shared=0, score="softmax", renormalize=True)
    return model

  def hf_config(self, m) -> dict:
    self.check_writable(m)
    if not m.moe.renormalize:
      raise unsupported("mixtral config.json", "moe.renormalize", False, "Mixtral renormalises its top-k weights.")
    if m.ffn_dim != m.moe.expert_ffn_dim:
      raise unsupported("mixtral config.json", "ffn_dim", m.ffn_dim, "set it to moe.expert_ffn_dim (unused by MoE).")
    sliding = _attention_types(m)[0] == "sliding"
    return dict(common_hf(m, self), **self.hf_attention(m), intermediate_size=m.moe.expert_ffn_dim,
                num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, router_jitter_noise=0.0,
                sliding_window=m.attention.window if sliding else None)
