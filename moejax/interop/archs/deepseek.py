"""DeepSeek-V3 and V3.2: MLA (``mla``) / DSA (``dsa``) attention + DeepSeekMoE.

Routing: sigmoid scores, the aux-loss-free selection bias
(``e_score_correction_bias`` -> collection ``router_bias``), group-limited
top-k (``n_group``/``topk_group``), renormalised (``norm_topk_prob``) and
scaled (``routed_scaling_factor``) weights, ``n_shared_experts`` shared
experts. The first ``first_k_dense_replace`` layers (V3.2:
``mlp_layer_types``) are dense SwiGLUs of width ``intermediate_size``, the
``mlp_types`` schedule. The checkpoints' MTP layers (index >=
``num_hidden_layers``) are dropped with a logged notice.
"""

from __future__ import annotations

import re

from moejax.config import expand_schedule
from moejax.interop import layout
from moejax.interop.archs.registry import (ARCHS, Arch, HFFields, common_hf, common_model, read_rope, unsupported,
                                           write_rope)

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def moe_config(f: HFFields, score: str) -> dict:
  """``model.moe`` of a DeepSeek checkpoint (V3, V3.2, V4)."""
  return dict(num_experts=f("n_routed_experts"), top_k=f("num_experts_per_tok"),
              expert_ffn_dim=f("moe_intermediate_size"), num_shared=f("n_shared_experts", 0), score=score,
              score_bias=True, renormalize=bool(f("norm_topk_prob", True)),
              routed_scale=float(f("routed_scaling_factor", 1.0)))


def moe_hf(m) -> dict:
  moe = m.moe
  return dict(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_ffn_dim,
              n_shared_experts=moe.num_shared, norm_topk_prob=bool(moe.renormalize),
              routed_scaling_factor=moe.routed_scale)


def mtp_notice(name: str, m) -> str | None:
  """DeepSeek checkpoints append their MTP modules as layers >= num_hidden_layers."""
  match = _LAYER.match(name)
  if match and int(match.group(1)) >= m.num_layers:
    return ("multi-token-prediction layer of the checkpoint (num_nextn_predict_layers): moejax keeps the main model; "
            "train new MTP modules with model.mtp.depth")
  return None


@ARCHS.register("deepseek_v3")
class DeepseekV3(Arch):
  model_type, architecture, attention_type = "deepseek_v3", "DeepseekV3ForCausalLM", "mla"
  # Derived (head_dim, qk_head_dim), upstream-only (ep_size), MTP (dropped, logged), training-only losses.
  ignored = frozenset({"head_dim", "qk_head_dim", "ep_size", "num_nextn_predict_layers", "aux_loss_alpha", "seq_aux",
                       "num_key_value_heads"})

  def dense_layers(self, f: HFFields, n: int) -> set[int]:
    return set(range(f("first_k_dense_replace", 0)))

  def model_config(self, f: HFFields) -> dict:
    model = common_model(f)
    n = model["num_layers"]
    f.expect("attention_bias", (False,), False)
    f.expect("mlp_bias", (False,), False)
    f.expect("scoring_func", ("sigmoid",), "sigmoid")
    f.expect("topk_method", ("noaux_tc",), "noaux_tc")
    f.expect("moe_layer_freq", (1,), 1)
    theta, yarn = read_rope(f)
    dense = self.dense_layers(f, n)
    attention = dict(q_lora_rank=f("q_lora_rank", 0), kv_lora_rank=f("kv_lora_rank"),
                     qk_nope_head_dim=f("qk_nope_head_dim"), qk_rope_head_dim=f("qk_rope_head_dim"),
                     v_head_dim=f("v_head_dim"), rope_layout="interleave" if f("rope_interleave", True) else "half")
    if yarn:
      attention["yarn"] = yarn
    model.update(num_kv_heads=model["num_heads"], rope_theta=theta, ffn_dim=f("intermediate_size"),
                 attention_types=(self.attention_type,),
                 mlp_types=tuple("dense" if i in dense else "moe" for i in range(n)),
                 attention=attention, moe=dict(moe_config(f, "sigmoid"), num_groups=f("n_group", 1),
                                               topk_groups=f("topk_group", 1)))
    return model

  def check_writable(self, m) -> None:
    what = f"{self.model_type} config.json"
    if set(expand_schedule(m.attention_types, m.num_layers)) != {self.attention_type}:
      raise unsupported(what, "attention_types", m.attention_types,
                        f"{self.model_type} has {self.attention_type!r} attention on every layer.")
    types = expand_schedule(m.mlp_types, m.num_layers)
    checks = [("hc.streams", m.hc.streams, 1), ("attention.sinks", m.attention.sinks, False)]
    if "moe" in types:  # an all-dense model (first_k_dense_replace = num_layers) has no router to match
      checks += [("moe.score", m.moe.score, "sigmoid"), ("moe.score_bias", m.moe.score_bias, True),
                 ("moe.router", m.moe.router, "topk"), ("moe.swiglu_limit", m.moe.swiglu_limit, 0.0)]
    for field, value, want in checks:
      if value != want:
        raise unsupported(what, field, value, f"{self.model_type} needs {want!r}.")
    dense = [t == "dense" for t in types]
    if set(types) - {"dense", "moe"} or dense != sorted(dense, reverse=True):
      raise unsupported(what, "mlp_types", m.mlp_types, "DeepSeek has dense layers first, then moe layers.")

  def hf_config(self, m) -> dict:
    self.check_writable(m)
    a = m.attention
    dense = sum(t == "dense" for t in expand_schedule(m.mlp_types, m.num_layers))
    return dict(common_hf(m, self), **moe_hf(m), num_key_value_heads=m.num_heads, intermediate_size=m.ffn_dim,
                first_k_dense_replace=dense, n_group=m.moe.num_groups, topk_group=m.moe.topk_groups,
                q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
                qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
                rope_interleave=a.rope_layout == "interleave", rope_parameters=write_rope(m.rope_theta, a.yarn),
                max_position_embeddings=max(4096, a.yarn.original_max_len), attention_bias=False,
                num_nextn_predict_layers=0)

  def attention_tensors(self, m, ours: str, theirs: str) -> list:
    p = lambda o, t, n_in=1: layout.param(f"{ours}/{o}", f"{theirs}.{t}.weight", "linear", n_in)
    out = [p("w_kv_a", "kv_a_proj_with_mqa"), p("w_kv_b", "kv_b_proj"), p("w_o", "o_proj", 2),
           layout.param(f"{ours}/kv_a_norm/scale", f"{theirs}.kv_a_layernorm.weight")]
    if m.attention.q_lora_rank:
      out += [p("w_q_a", "q_a_proj"), p("w_q_b", "q_b_proj"),
              layout.param(f"{ours}/q_a_norm/scale", f"{theirs}.q_a_layernorm.weight")]
    else:
      out.append(p("w_q", "q_proj"))
    return out

  def tensors(self, m) -> list:
    out = layout.trunk(m)
    for i, mlp_type in enumerate(expand_schedule(m.mlp_types, m.num_layers)):
      p, ours = f"model.layers.{i}", f"layer_{i}"
      out += self.attention_tensors(m, f"{ours}/attention", f"{p}.self_attn")
      if mlp_type == "dense":
        out += layout.swiglu(f"{ours}/mlp", f"{p}.mlp")
        continue
      out.append(layout.param(f"{ours}/mlp/router/w_gate", f"{p}.mlp.gate.weight", "linear"))
      out += layout.experts(f"{ours}/mlp", f"{p}.mlp.experts", m.moe.num_experts)
      if m.moe.num_shared:
        out += layout.swiglu(f"{ours}/mlp/shared", f"{p}.mlp.shared_experts")
      out += layout.moe_state(f"{ours}/mlp", f"{p}.mlp.gate", "e_score_correction_bias", None)
    return out

  def dropped(self, name, m):
    return mtp_notice(name, m)


@ARCHS.register("deepseek_v32")
class DeepseekV32(DeepseekV3):
  """V3 with DeepSeek sparse attention: MLA over the lightning indexer's top-k (``dsa``)."""

  model_type, architecture, attention_type = "deepseek_v32", "DeepseekV32ForCausalLM", "dsa"

  def dense_layers(self, f: HFFields, n: int) -> set[int]:
    types = f("mlp_layer_types", None)
    f.expect("layer_types", (None, ["indexed_attention"] * n))
    if types is None:
      return super().dense_layers(f, n)
    f.used.add("first_k_dense_replace")
    bad = set(types) - {"dense", "sparse"}
    if bad:
      raise unsupported("deepseek_v32 model", "mlp_types", sorted(bad), "mlp_layer_types entries are dense|sparse.")
    return {i for i, t in enumerate(types) if t == "dense"}

  def model_config(self, f: HFFields) -> dict:
    model = super().model_config(f)
    if f("rope_interleave", True) is not True:
      raise unsupported("deepseek_v32 model", "attention.rope_layout", "half", "V3.2 rotates interleaved pairs.")
    model["attention"].update(index_topk=f("index_topk"), index_head_dim=f("index_head_dim"),
                              index_heads=f("index_n_heads"))
    return model

  def check_writable(self, m) -> None:
    super().check_writable(m)
    if m.attention.rope_layout != "interleave":
      raise unsupported("deepseek_v32 config.json", "attention.rope_layout", m.attention.rope_layout,
                        "V3.2 uses 'interleave'.")

  def hf_config(self, m) -> dict:
    out = super().hf_config(m)
    del out["rope_interleave"]
    a = m.attention
    types = expand_schedule(m.mlp_types, m.num_layers)
    return dict(out, index_topk=a.index_topk, index_head_dim=a.index_head_dim, index_n_heads=a.index_heads,
                mlp_layer_types=["dense" if t == "dense" else "sparse" for t in types])

  def attention_tensors(self, m, ours, theirs):
    idx, p = f"{theirs}.indexer", lambda o, t: layout.param(f"{ours}/indexer/{o}", f"{idx}.{t}.weight", "linear")
    return super().attention_tensors(m, ours, theirs) + [
        p("w_q_b", "wq_b"), p("w_k", "wk"), p("w_weights", "weights_proj"),
        layout.param(f"{ours}/indexer/k_norm/scale", f"{idx}.k_norm.weight"),
        layout.param(f"{ours}/indexer/k_norm/bias", f"{idx}.k_norm.bias")]
