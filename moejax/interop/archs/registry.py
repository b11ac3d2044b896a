"""Per-architecture mappings, registered by Hugging Face ``model_type``.

An architecture (:class:`Arch`) gives, both ways:

* the config translation: ``model_config(fields)`` reads an HF
  ``config.json`` dict through :class:`HFFields` into ``model.*`` updates,
  ``hf_config(model_cfg)`` writes one back. Every HF field is either read,
  or listed as known-irrelevant (``COMMON_IGNORED`` + ``Arch.ignored``); any
  other field with a value that is not "off" (None, False, 0, empty) is an
  error naming it, so nothing is silently dropped;
* the tensor mapping: ``tensors(model_cfg)`` lists every moejax variable with
  the HF tensor(s) and the layout (``moejax/interop/layout.py``) it comes from.

The model code stays generic: an architecture only picks registry names and
config values. Add one with ``@ARCHS.register("model_type")`` in a module that
``moejax/interop/archs/__init__.py`` imports.
"""

from __future__ import annotations

from typing import Any, ClassVar

import ml_collections

from moejax.config import ConfigError
from moejax.registry import Registry

ARCHS = Registry("Hugging Face model_type")

# Fields of every HF config that do not change the forward pass (serving,
# generation, training-only switches of transformers, bookkeeping).
COMMON_IGNORED = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
    "output_router_logits", "router_aux_loss_coef", "auto_map", "_name_or_path", "tokenizer_class",
    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id", "chunk_size_feed_forward",
    "is_encoder_decoder", "tie_encoder_decoder", "pretraining_tp", "problem_type", "num_labels",
    "quantization_config",  # read by safetensors_io.CheckpointReader: dequantized (block FP8) or an error
})

MISSING = object()


class HFFields:
  """An HF config dict, read field by field; :meth:`finish` rejects what was not read."""

  def __init__(self, hf: dict[str, Any]):
    self.hf, self.used = dict(hf), set()
    self.model_type = hf.get("model_type", "?")
    self.training_settings: dict[str, Any] = {}  # training-only fields that are not "off" (see training_only)

  def __call__(self, name: str, default: Any = MISSING) -> Any:
    self.used.add(name)
    if name in self.hf and self.hf[name] is not None:
      return self.hf[name]
    if default is MISSING:
      raise ConfigError(f"{self.model_type} config.json: field {name!r} is required but missing.")
    return default

  def expect(self, name: str, allowed: tuple, default: Any = None) -> Any:
    """A field whose only supported values are ``allowed`` (default: its absence)."""
    value = self(name, default)
    if value not in allowed:
      raise ConfigError(f"{self.model_type} config.json: {name}={value!r} is not supported by moejax "
                        f"(supported: {', '.join(map(repr, allowed))}); moejax has no layer option for it.")
    return value

  def training_only(self, name: str) -> None:
    """A field that changes training only (dropout, router jitter): moejax has no such option, so a
    value that is not "off" is recorded; ``hf.config_from_hf`` logs it, or refuses it for training."""
    value = self(name, 0.0)
    if value not in (None, False, 0, 0.0):
      self.training_settings[name] = value

  def finish(self, ignored: frozenset[str]) -> None:
    bad = [f"{k}={v!r}" for k, v in sorted(self.hf.items())
           if k not in self.used and k not in ignored and k not in COMMON_IGNORED and v not in (None, False, 0, [], {})]
    if bad:
      raise ConfigError(f"{self.model_type} config.json: unsupported field(s) {', '.join(bad)}; moejax's "
                        f"{self.model_type} mapping does not know them and will not drop them silently. Remove "
                        "them if they do not change the model, or add them to the mapping in moejax/interop/archs/.")


def read_rope(f: HFFields, params: dict | None = None, theta_field: str = "rope_theta") -> tuple[float, dict]:
  """(theta, yarn updates) from ``rope_parameters`` (or the legacy ``rope_theta`` + ``rope_scaling``)."""
  if params is None:
    params = dict(f("rope_parameters", None) or f("rope_scaling", None) or {})
  theta = float(params.get("rope_theta", f(theta_field, 10_000.0)))
  f.used.add(theta_field)
  kind = params.get("rope_type", params.get("type", "default"))
  known = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
  yarn = {}
  if kind == "yarn":
    if params.get("truncate", True) is not True:
      raise ConfigError(f"{f.model_type}: rope_parameters.truncate=False is not supported (moejax's YaRN truncates).")
    yarn = dict(factor=float(params["factor"]), beta_fast=float(params.get("beta_fast") or 32.0),
                beta_slow=float(params.get("beta_slow") or 1.0), mscale=float(params.get("mscale") or 0.0),
                mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
                attention_factor=float(params.get("attention_factor") or 0.0),
                original_max_len=int(params.get("original_max_position_embeddings") or f("max_position_embeddings")))
    known |= {"factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
              "original_max_position_embeddings", "truncate"}
  elif kind != "default":
    raise ConfigError(f"{f.model_type}: rope_type {kind!r} is not supported (moejax has default and yarn RoPE).")
  extra = sorted(set(params) - known)
  if extra:
    raise ConfigError(f"{f.model_type}: unsupported rope_parameters field(s) {extra}.")
  return theta, yarn


def write_rope(theta: float, yarn: ml_collections.ConfigDict, **extra) -> dict:
  """``rope_parameters`` for ``theta`` and a moejax ``yarn`` config."""
  if yarn.factor <= 1:
    return {"rope_type": "default", "rope_theta": theta, **extra}
  out = {"rope_type": "yarn", "rope_theta": theta, "factor": yarn.factor, "beta_fast": yarn.beta_fast,
         "beta_slow": yarn.beta_slow, "original_max_position_embeddings": yarn.original_max_len, **extra}
  for k in ("mscale", "mscale_all_dim", "attention_factor"):
    if yarn[k]:
      out[k] = yarn[k]
  return out


class Arch:
  """Base of an architecture mapping (see the module docstring)."""

  model_type: ClassVar[str] = ""
  architecture: ClassVar[str] = ""          # the ``architectures`` entry of config.json
  ignored: ClassVar[frozenset[str]] = frozenset()

  def model_config(self, f: HFFields) -> dict:
    raise NotImplementedError

  def hf_config(self, m: ml_collections.ConfigDict) -> dict:
    raise NotImplementedError

  def tensors(self, m: ml_collections.ConfigDict) -> list:
    raise NotImplementedError

  def check_writable(self, m: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first ``model.*`` field (and the value) this architecture
    cannot express; silent when ``m`` is exactly of this architecture (how :func:`hf.save` infers it)."""
    raise NotImplementedError

  def constant_tensors(self, m: ml_collections.ConfigDict) -> dict:
    """HF tensors with no moejax variable that the export writes (name -> numpy array)."""
    return {}

  def canonical(self, name: str) -> str:
    """The name ``tensors`` uses for a checkpoint tensor name (other spellings of a release)."""
    return name

  def dropped(self, name: str, m: ml_collections.ConfigDict) -> str | None:
    """Why an HF tensor with no moejax counterpart may be dropped (logged), or None (an error)."""
    return None


def common_hf(m: ml_collections.ConfigDict, arch: Arch) -> dict:
  """The config.json fields every architecture shares."""
  return {"architectures": [arch.architecture], "model_type": arch.model_type, "vocab_size": m.vocab_size,
          "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
          "rms_norm_eps": m.norm_eps, "tie_word_embeddings": bool(m.tie_embeddings), "hidden_act": "silu",
          "dtype": m.param_dtype}


def common_model(f: HFFields) -> dict:
  """The ``model.*`` fields every architecture shares."""
  f.expect("hidden_act", ("silu",), "silu")
  f.training_only("attention_dropout")
  return dict(vocab_size=f("vocab_size"), d_model=f("hidden_size"), num_layers=f("num_hidden_layers"),
              num_heads=f("num_attention_heads"), norm_eps=float(f("rms_norm_eps")),
              tie_embeddings=bool(f("tie_word_embeddings", False)))


def unsupported(what: str, field: str, value, fix: str) -> ConfigError:
  return ConfigError(f"cannot write {what}: model.{field}={value!r} has no Hugging Face counterpart; {fix}")
