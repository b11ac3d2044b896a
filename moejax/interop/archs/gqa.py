"""Grouped-query attention (``dense`` / ``sliding``) as Llama-family checkpoints
spell it: ``self_attn.{q,k,v,o}_proj``, optional per-head ``q_norm``/``k_norm``
(``attention.qk_norm``), rotate-half RoPE on the leading ``rope_dim`` channels
(``partial_rotary_factor``). Shared by the dense (Llama, Qwen3) and MoE
(Qwen3-MoE, Mixtral, GLM-4-MoE) mappings.
"""

from __future__ import annotations

from typing import ClassVar

from moejax.config import expand_schedule
from moejax.interop.archs.registry import Arch, HFFields, read_rope, unsupported, write_rope

WINDOW_DEFAULT = 128  # model.attention.window when a checkpoint has no sliding layers


def attention_types(m) -> tuple[str, ...]:
  return tuple(expand_schedule(m.attention_types, m.num_layers))


def mlp_types(m) -> tuple[str, ...]:
  return tuple(expand_schedule(m.mlp_types, m.num_layers))


def window(f: HFFields, enabled: bool) -> dict:
  """``attention_types`` / ``window`` of a checkpoint with one window on every layer (or none)."""
  size = f("sliding_window", None) if enabled else None
  return dict(attention_types=("sliding",) if size else ("dense",), window=size or WINDOW_DEFAULT)


def field_value(m, field: str):
  value = m
  for part in field.split("."):
    value = value[part]
  return value


class GQA(Arch):
  """Base of the GQA architectures; subclasses add the MLP side."""

  qk_norm: ClassVar[bool | None] = False  # None: a config.json switch (``use_qk_norm``)
  partial_rope: ClassVar[bool] = False    # reads/writes rope_parameters.partial_rotary_factor
  one_attention_kind: ClassVar[bool] = True  # all layers dense, or all sliding (per-layer: layer_types)

  def attention_model(self, f: HFFields, window: dict) -> dict:
    theta, yarn = read_rope(f)
    f.expect("attention_bias", (False,), False)
    head_dim = f("head_dim", 0)
    model = dict(num_kv_heads=f("num_key_value_heads"), head_dim=head_dim, rope_theta=theta,
                 attention_types=window["attention_types"])
    qk_norm = bool(f("use_qk_norm", False)) if self.qk_norm is None else self.qk_norm
    attention = dict(qk_norm=qk_norm, window=window["window"], rope_layout="half")
    params = dict(f("rope_parameters", None) or f("rope_scaling", None) or {})
    factor = float(params.get("partial_rotary_factor", f("partial_rotary_factor", 1.0)))
    if factor != 1.0 and not self.partial_rope:
      raise unsupported(f"{self.model_type} model", "attention.rope_dim", factor,
                        f"{self.model_type} rotates the whole head (partial_rotary_factor=1).")
    if factor != 1.0:
      head = head_dim or f("hidden_size") // f("num_attention_heads")
      attention["rope_dim"] = int(head * factor)
    if yarn:
      attention["yarn"] = yarn
    return dict(model, attention=attention)

  def check_attention(self, m) -> None:
    """Raises ConfigError naming the first attention field this architecture cannot express."""
    what = f"{self.model_type} config.json"
    types = set(attention_types(m))
    if not types <= {"dense", "sliding"}:
      raise unsupported(what, "attention_types", m.attention_types,
                        f"{self.model_type} has grouped-query attention: use 'dense' (or 'sliding') layers.")
    if self.one_attention_kind and len(types) != 1:
      raise unsupported(what, "attention_types", m.attention_types, "HF applies one attention kind to all layers.")
    if self.qk_norm is not None and m.attention.qk_norm != self.qk_norm:
      raise unsupported(what, "attention.qk_norm", m.attention.qk_norm,
                        f"{self.model_type} {'always has' if self.qk_norm else 'has no'} per-head q/k RMSNorms; "
                        f"set --config.model.attention.qk_norm={not m.attention.qk_norm} (or another --model-type).")
    checks = [("attention.sinks", not m.attention.sinks), ("attention.rope_layout", m.attention.rope_layout == "half"),
              ("hc.streams", m.hc.streams == 1)]
    if not self.partial_rope:
      checks.append(("attention.rope_dim", m.attention.rope_dim == 0))
    for field, ok in checks:
      if not ok:
        raise unsupported(what, field, field_value(m, field), f"{self.model_type} has no such option.")

  def hf_attention(self, m) -> dict:
    head = {"head_dim": m.head_dim} if m.head_dim else {}  # absent: hidden_size // num_heads, as in moejax
    extra, switch = {}, {} if self.qk_norm is not None else {"use_qk_norm": bool(m.attention.qk_norm)}
    if self.partial_rope:
      rotated = m.attention.rope_dim or m.head_dim or m.d_model // m.num_heads
      extra["partial_rotary_factor"] = rotated / (m.head_dim or m.d_model // m.num_heads)
    return dict(num_key_value_heads=m.num_kv_heads, **head, **switch,
                rope_parameters=write_rope(m.rope_theta, m.attention.yarn, **extra), attention_bias=False,
                attention_dropout=0.0, max_position_embeddings=max(4096, m.attention.yarn.original_max_len))
