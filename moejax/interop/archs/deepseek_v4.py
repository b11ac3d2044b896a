"""DeepSeek-V4: shared-KV attention over a sliding window plus compressed
entries (``swa`` / ``csa`` / ``hca``, with sinks and a grouped low-rank output),
mHC residual streams (``model.hc``), hash-routed first layers (``hash_moe``,
``tid2eid`` -> collection ``hash_table``), sqrtsoftplus routing with the
selection bias and the SwiGLU clamp (``moe.swiglu_limit``).

Tensor names are those ``save_pretrained`` writes (DeepSeek's release
layout: ``attn.wq_a``, ``ffn.experts.{e}.w1``, ``hc_attn_fn``, ``head``, ...),
which SGLang / vLLM read too; the release's own top-level spellings
(``embed.weight``, ``layers.N.``, ``norm.weight``, ``hc_head_fn``) are read as well.
"""

from __future__ import annotations

import re

from moejax.config import expand_schedule
from moejax.interop import layout
from moejax.interop.archs.registry import (ARCHS, Arch, HFFields, common_hf, common_model, read_rope, unsupported,
                                           write_rope)
from moejax.interop.archs.deepseek import moe_config, moe_hf, mtp_notice

ATTENTION = {"sliding_attention": "swa", "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}
HF_ATTENTION = {v: k for k, v in ATTENTION.items()}
RATIO_FIELD = {"csa": "csa_ratio", "hca": "hca_ratio"}
# DeepSeek's release spells the top level without transformers' "model." prefix.
RELEASE_NAMES = ((re.compile(r"^embed\.weight$"), "model.embed_tokens.weight"),
                 (re.compile(r"^norm\."), "model.norm."), (re.compile(r"^layers\."), "model.layers."),
                 (re.compile(r"^hc_head_(fn|base|scale)$"), r"model.hc_head.hc_\1"))


@ARCHS.register("deepseek_v4")
class DeepseekV4(Arch):
  model_type, architecture = "deepseek_v4", "DeepseekV4ForCausalLM"
  ignored = frozenset({"qk_rope_head_dim", "num_nextn_predict_layers", "rope_theta", "compress_rope_theta"})

  def check_writable(self, m) -> None:
    a, what = m.attention, "deepseek_v4 config.json"
    if not set(expand_schedule(m.attention_types, m.num_layers)) <= set(ATTENTION.values()):
      raise unsupported(what, "attention_types", m.attention_types, "DeepSeek-V4 layers are swa, csa or hca.")
    for field, value, ok in (("num_kv_heads", m.num_kv_heads, m.num_kv_heads == 1),
                             ("hc.streams", m.hc.streams, m.hc.streams > 1),
                             ("moe.num_groups", m.moe.num_groups, m.moe.num_groups == 1),
                             ("moe.score_bias", m.moe.score_bias, m.moe.score_bias),
                             ("moe.router", m.moe.router, m.moe.router == "topk"),
                             ("attention.rope_layout", a.rope_layout, a.rope_layout == "interleave"),
                             ("mlp_types", m.mlp_types,
                              set(expand_schedule(m.mlp_types, m.num_layers)) <= {"moe", "hash_moe"})):
      if not ok:
        raise unsupported(what, field, value, "DeepSeek-V4 fixes it (1 kv head, mHC, topk router with bias, ...).")

  def model_config(self, f: HFFields) -> dict:
    model = common_model(f)
    head = f("head_dim")
    for field in ("attention_bias", "mlp_bias"):
      f.expect(field, (False,), False)
    f.expect("num_key_value_heads", (1,), 1)
    f.training_only("router_jitter_noise")
    if f("hc_mult") < 2:
      raise unsupported("deepseek_v4 model", "hc.streams", f("hc_mult"), "hc_mult=1 still runs the mHC maps in "
                        "transformers, while moejax's hc.streams=1 is the plain residual; use hc_mult >= 2.")
    rope = dict(f("rope_parameters", None) or {})
    if set(rope) != {"main", "compress"}:
      raise unsupported("deepseek_v4 model", "rope", rope, "expected rope_parameters with 'main' and 'compress'.")
    theta, yarn = read_rope(f, rope["main"])
    compress_theta, compress_yarn = read_rope(f, rope["compress"], "compress_rope_theta")
    factor = f("partial_rotary_factor", rope["main"].get("partial_rotary_factor", 64 / 512))
    rates = f("compress_rates", {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    types = [ATTENTION.get(t, t) for t in f("layer_types")]
    unknown = sorted(set(types) - set(ATTENTION.values()))
    if unknown:
      raise unsupported("deepseek_v4 model", "attention_types", unknown, f"known: {sorted(ATTENTION)}.")
    attention = dict(q_lora_rank=f("q_lora_rank"), window=f("sliding_window"), o_groups=f("o_groups"),
                     o_lora_rank=f("o_lora_rank"), rope_dim=int(head * factor), rope_layout="interleave",
                     csa_ratio=rates.get("compressed_sparse_attention", 4),
                     hca_ratio=rates.get("heavily_compressed_attention", 128), index_heads=f("index_n_heads"),
                     index_head_dim=f("index_head_dim"), index_topk=f("index_topk"),
                     compress_rope_theta=compress_theta)
    if yarn:
      attention["yarn"] = yarn
    if compress_yarn:
      attention["compress_yarn"] = compress_yarn
    mlp_types = tuple(f("mlp_layer_types"))
    if set(mlp_types) - {"moe", "hash_moe"}:
      raise unsupported("deepseek_v4 model", "mlp_types", mlp_types, "entries are moe|hash_moe.")
    model.update(num_kv_heads=1, head_dim=head, rope_theta=theta, attention_types=tuple(types), mlp_types=mlp_types,
                 ffn_dim=f("moe_intermediate_size"), attention=attention,
                 hc=dict(streams=f("hc_mult"), sinkhorn_iters=f("hc_sinkhorn_iters"), eps=float(f("hc_eps"))),
                 moe=dict(moe_config(f, f("scoring_func", "sqrtsoftplus")), swiglu_limit=float(f("swiglu_limit", 0.0))))
    return model

  def hf_config(self, m) -> dict:
    self.check_writable(m)
    a = m.attention
    head = m.head_dim or m.d_model // m.num_heads
    factor = (a.rope_dim or head) / head
    types = expand_schedule(m.attention_types, m.num_layers)
    rope = {"main": write_rope(m.rope_theta, a.yarn, partial_rotary_factor=factor),
            "compress": write_rope(a.compress_rope_theta or m.rope_theta, a.compress_yarn,
                                   partial_rotary_factor=factor)}
    return dict(common_hf(m, self), **moe_hf(m), num_key_value_heads=1, head_dim=head, q_lora_rank=a.q_lora_rank,
                scoring_func=m.moe.score, swiglu_limit=m.moe.swiglu_limit, sliding_window=a.window,
                o_groups=a.o_groups, o_lora_rank=a.o_lora_rank, index_n_heads=a.index_heads,
                index_head_dim=a.index_head_dim, index_topk=a.index_topk, rope_theta=m.rope_theta,
                compress_rope_theta=a.compress_rope_theta or m.rope_theta, partial_rotary_factor=factor,
                rope_parameters=rope, layer_types=[HF_ATTENTION[t] for t in types],
                compress_rates={HF_ATTENTION[t]: a[RATIO_FIELD[t]] for t in ("csa", "hca")},
                mlp_layer_types=list(expand_schedule(m.mlp_types, m.num_layers)), hc_mult=m.hc.streams,
                hc_sinkhorn_iters=m.hc.sinkhorn_iters, hc_eps=m.hc.eps, num_nextn_predict_layers=0,
                max_position_embeddings=max(4096, a.yarn.original_max_len, a.compress_yarn.original_max_len))

  def tensors(self, m) -> list:
    out = layout.trunk(m, head="head.weight", norms=("attn_norm", "ffn_norm"))
    out += [layout.param(f"hc_head/{n}", f"model.hc_head.hc_{n}", "linear" if n == "fn" else "copy", n_in=2)
            for n in ("fn", "base", "scale")]
    schedule = zip(expand_schedule(m.attention_types, m.num_layers), expand_schedule(m.mlp_types, m.num_layers))
    for i, (attention_type, mlp_type) in enumerate(schedule):
      p, ours = f"model.layers.{i}", f"layer_{i}"
      out += _attention(f"{ours}/attention", f"{p}.attn", attention_type)
      for o, t in (("attention_hc", "hc_attn"), ("mlp_hc", "hc_ffn")):
        out += [layout.param(f"{ours}/{o}/{n}", f"{p}.{t}_{n}", "linear" if n == "fn" else "copy", n_in=2)
                for n in ("fn", "base", "scale")]
      names = ("w1", "w3", "w2")
      out.append(layout.param(f"{ours}/mlp/router/w_gate", f"{p}.ffn.gate.weight", "linear"))
      out += layout.experts(f"{ours}/mlp", f"{p}.ffn.experts", m.moe.num_experts, names)
      if m.moe.num_shared:
        out += layout.swiglu(f"{ours}/mlp/shared", f"{p}.ffn.shared_experts", names)
      hashed = mlp_type == "hash_moe"
      out += layout.moe_state(f"{ours}/mlp", f"{p}.ffn.gate", None if hashed else "bias", "tid2eid" if hashed else None)
    return out

  def canonical(self, name: str) -> str:
    for pattern, replacement in RELEASE_NAMES:
      name = pattern.sub(replacement, name)
    return name

  def dropped(self, name, m):
    return mtp_notice(name, m)


def _compressor(ours: str, theirs: str) -> list:
  return [layout.param(f"{ours}/w_kv", f"{theirs}.wkv.weight", "linear"),
          layout.param(f"{ours}/w_gate", f"{theirs}.wgate.weight", "linear"),
          layout.param(f"{ours}/position_bias", f"{theirs}.ape"),
          layout.param(f"{ours}/kv_norm/scale", f"{theirs}.norm.weight")]


def _attention(ours: str, theirs: str, attention_type: str) -> list:
  lin = lambda o, t, n_in=1: layout.param(f"{ours}/{o}", f"{theirs}.{t}.weight", "linear", n_in)
  out = [lin("w_q_a", "wq_a"), lin("w_q_b", "wq_b"), lin("w_kv", "wkv"), lin("w_o_b", "wo_b", 2),
         layout.param(f"{ours}/w_o_a", f"{theirs}.wo_a.weight", "grouped"),
         layout.param(f"{ours}/q_a_norm/scale", f"{theirs}.q_norm.weight"),
         layout.param(f"{ours}/kv_norm/scale", f"{theirs}.norm.weight"),
         layout.param(f"{ours}/sinks", f"{theirs}.attn_sink")]
  if attention_type in ("csa", "hca"):
    out += _compressor(f"{ours}/compressor", f"{theirs}.compressor")
  if attention_type == "csa":
    out += _compressor(f"{ours}/indexer", f"{theirs}.indexer.compressor")
    out += [lin("indexer/w_q_b", "indexer.wq_b"), lin("indexer/w_weights", "indexer.weights_proj")]
  return out
