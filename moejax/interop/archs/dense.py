"""Llama and Qwen3: GQA attention + a SwiGLU on every layer (moejax's dense
block: ``mlp_types=("dense",)``, width ``ffn_dim`` = ``intermediate_size``).

Both are pre-norm RMSNorm blocks with rotate-half RoPE over the whole head;
Llama has no q/k norms (``attention.qk_norm=False``, e.g. ``configs/tiny.py``),
Qwen3 always has them (``qk_norm=True``) and may make layers ``sliding``
(``layer_types``: ``full_attention`` / ``sliding_attention``, with
``sliding_window``).
"""

from __future__ import annotations

from moejax.interop import layout
from moejax.interop.archs.registry import ARCHS, HFFields, common_hf, common_model, unsupported
from moejax.interop.archs.gqa import GQA, WINDOW_DEFAULT, attention_types, mlp_types

LAYER_TYPES = {"full_attention": "dense", "sliding_attention": "sliding"}
HF_LAYER_TYPES = {v: k for k, v in LAYER_TYPES.items()}


class _Dense(GQA):
  def check_writable(self, m) -> None:
    self.check_attention(m)
    if set(mlp_types(m)) != {"dense"}:
      raise unsupported(f"{self.model_type} config.json", "mlp_types", m.mlp_types,
                        f"{self.model_type} has a dense SwiGLU on every layer: use mlp_types=('dense',).")

  def tensors(self, m) -> list:
    out = layout.trunk(m)
    for i in range(m.num_layers):
      out += layout.dense_attention(f"layer_{i}/attention", f"model.layers.{i}.self_attn", self.qk_norm)
      out += layout.swiglu(f"layer_{i}/mlp", f"model.layers.{i}.mlp")
    return out


@ARCHS.register("llama")
class Llama(_Dense):
  model_type, architecture = "llama", "LlamaForCausalLM"

  def model_config(self, f: HFFields) -> dict:
    model = common_model(f)
    f.expect("mlp_bias", (False,), False)
    f.expect("pretraining_tp", (1,), 1)
    model.update(self.attention_model(f, dict(attention_types=("dense",), window=WINDOW_DEFAULT)))
    return dict(model, mlp_types=("dense",), ffn_dim=f("intermediate_size"))

  def hf_config(self, m) -> dict:
    self.check_writable(m)
    return dict(common_hf(m, self), **self.hf_attention(m), intermediate_size=m.ffn_dim, mlp_bias=False)


@ARCHS.register("qwen3")
class Qwen3(_Dense):
  model_type, architecture, qk_norm, one_attention_kind = "qwen3", "Qwen3ForCausalLM", True, False
  ignored = frozenset({"max_window_layers"})  # read only to derive a missing layer_types

  def model_config(self, f: HFFields) -> dict:
    model = common_model(f)
    n = model["num_layers"]
    size = f("sliding_window", None) if f("use_sliding_window", False) else None  # as transformers' Qwen3Config
    f.used.add("sliding_window")
    layer_types = f("layer_types", None) or [
        "sliding_attention" if size is not None and i >= f("max_window_layers", 28) else "full_attention"
        for i in range(n)]
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
      raise unsupported("qwen3 model", "attention_types", unknown, f"layer_types entries are {sorted(LAYER_TYPES)}.")
    types = tuple(LAYER_TYPES[t] for t in layer_types)
    if "sliding" in types and not size:
      raise unsupported("qwen3 model", "attention.window", size, "sliding_attention layers need use_sliding_window "
                        "and a sliding_window.")
    model.update(self.attention_model(f, dict(attention_types=types, window=size or WINDOW_DEFAULT)))
    return dict(model, mlp_types=("dense",), ffn_dim=f("intermediate_size"))

  def hf_config(self, m) -> dict:
    self.check_writable(m)
    types = attention_types(m)
    sliding = "sliding" in types
    return dict(common_hf(m, self), **self.hf_attention(m), intermediate_size=m.ffn_dim,
                layer_types=[HF_LAYER_TYPES[t] for t in types], use_sliding_window=sliding,
                sliding_window=m.attention.window if sliding else None)
