"""Config validation: every bad field is named with its fix, before compiling."""

import jax
import pytest

from moejax.config import ConfigError, base_config, load_config
from moejax.validation import validate


def set_fields(cfg, **fields):
  """``cfg`` with fields given as ``section__name`` (or ``section__sub__name``) set as is (no coercion,
  so ill-typed values reach validation)."""
  for dotted, value in fields.items():
    *path, name = dotted.split("__")
    node = cfg
    for key in path:
      node = node[key]
    node[name] = value
  return cfg


def _cfg(**fields):
  """base_config() with ``set_fields``."""
  return set_fields(base_config(), **fields)


@pytest.mark.parametrize("fields,num_devices,message", [
    ({"optim__qk_clip_tau": 100.0, "model__attention__track_max_logit": True, "model__attention_types": ("mla",)},
     1, "QK-clip rescales per-head (query, key) projections ('w_q', 'w_k'), which only ['dense', 'sliding']"),
    ({"model__num_heads": 3}, 1, "model.num_heads=3 does not divide model.d_model=128"),
    ({"model__num_kv_heads": 3}, 1, "model.num_kv_heads=3 does not divide model.num_heads=4"),
    ({"model__attention_types": ("dense", "dense")}, 1, "model.attention_types has 2 entries but model.num_layers=4"),
    ({"model__attention_types": ("flash",)}, 1, "unknown attention type 'flash'"),
    ({"model__mlp_types": ("nope",)}, 1, "unknown mlp type 'nope'"),
    ({"model__dtype": "fp8"}, 1, "model.dtype='fp8'"),
    ({"model__vocab_size": 100}, 1, "--config.model.vocab_size=259"),
    ({"model__hc__streams": 0}, 1, "model.hc.streams=0 must be >= 1"),
    ({"model__hc__sinkhorn_iters": 0}, 1, "model.hc.sinkhorn_iters=0 must be >= 1"),
    ({"model__hc__eps": 0.0}, 1, "model.hc.eps=0.0 must be > 0"),
    ({"model__mtp__depth": 256}, 1, "model.mtp.depth=256 must be in [0, data.seq_len=256)"),
    ({"model__mtp__loss_weight": -0.1}, 1, "model.mtp.loss_weight=-0.1 must be >= 0"),
    ({"model__mtp__attention_type": "flash"}, 1, "model.mtp.attention_type: unknown attention type 'flash'"),
    ({"model__mtp__mlp_type": "nope"}, 1, "model.mtp.mlp_type: unknown mlp type 'nope'"),
    ({"data__source": "wikipedia"}, 1, "data.source='wikipedia' is unknown"),
    ({"data__source": "copy", "data__task_length": 1000}, 1, "data.task_length=1000 must be in [1, data.seq_len + 1 = 257]"),
    ({"data__source": "files"}, 1, "data.source='files' needs data.files"),
    ({"train__grad_accum_steps": 3}, 1, "train.grad_accum_steps=3 does not divide train.batch_size=16"),
    ({"optim__name": "adamq"}, 1, "optim.name='adamq' is unknown"),
    ({"optim__schedule": "linear"}, 1, "optim.schedule='linear' is unknown"),
    ({"optim__warmup_steps": -1}, 1, "optim.warmup_steps=-1 must be >= 0"),
    ({"optim__muon__coefficients": "cubic"}, 1, "optim.muon.coefficients='cubic' is unknown; known: polar_express, quintic"),
    ({"optim__muon__ns_dtype": "float16"}, 1, "optim.muon.ns_dtype='float16' must be 'bfloat16' or 'float32'"),
    ({"optim__muon__scale": "spectral"}, 1, "optim.muon.scale='spectral' is not one of"),
    ({"optim__muon__ns_steps": 0}, 1, "optim.muon.ns_steps=0 must be >= 1"),
    ({"optim__muon__momentum": 1.0}, 1, "optim.muon.momentum=1.0 must be in [0, 1)"),
    ({"optim__muon__exclude": ("router(",)}, 1, "optim.muon.exclude: 'router(' is not a regular expression"),
    ({"optim__qk_clip_tau": 100.0}, 1, "--config.model.attention.track_max_logit=True"),
    ({"mesh__fsdp": 3}, 8, "mesh: fixed axes multiply to 3, which does not divide the 8 devices"),
    ({"mesh__data": 2, "mesh__fsdp": 2}, 8, "multiply to 4 but there are 8 devices"),
    ({"mesh__data": -1, "mesh__fsdp": -1}, 8, "at most one axis may be -1"),
    ({"mesh__data": 1, "mesh__fsdp": 8, "train__batch_size": 4}, 8,
     "must divide over mesh.data*mesh.fsdp*mesh.expert=8"),
    ({"model__attention_types": ("csa",)}, 1, "model.attention.q_lora_rank=0 but ['csa'] layers need a low-rank query"),
    ({"model__mtp__depth": 1, "model__mtp__attention_type": "csa"}, 1,
     "model.attention.q_lora_rank=0 but ['csa'] layers need a low-rank query"),
    ({"model__attention_types": ("dsa",), "model__attention__q_lora_rank": 8, "model__attention__indexer_stage": "on"},
     1, "model.attention.indexer_stage='on' is not one of ('warmup', 'sparse', 'off')"),
    ({"model__attention_types": ("hca",), "model__attention__q_lora_rank": 8, "model__attention__o_groups": 3}, 1,
     "model.attention.o_groups=3 must divide model.num_heads=4"),
    ({"model__attention__rope_dim": 5}, 1, "model.attention.rope_dim=5 must be even"),
    ({"model__attention__rope_layout": "gptj"}, 1, "model.attention.rope_layout='gptj' is not one of"),
    ({"model__attention__implementation": "flash"}, 1, "model.attention.implementation='flash' is not one of"),
    ({"model__attention_types": ("sliding",), "model__attention__window": 0}, 1, "model.attention.window=0 must be >= 1"),
    ({"model__attention__qk_norm": True, "model__attention_types": ("mla",)}, 1, "qk_norm=True has no effect"),
    ({"model__attention__yarn__factor": 4.0, "model__attention__yarn__beta_slow": 64.0}, 1,
     "model.attention.yarn: beta_fast=32.0 must exceed beta_slow=64.0"),
    ({"model__attention_types": ("dsa",), "model__attention__q_lora_rank": 8, "model__attention__index_head_dim": 8,
      "model__attention__qk_rope_head_dim": 16}, 1, "model.attention.index_head_dim=8 is smaller than the 16 rope"),
    ({"model__attention__implementation": "cudnn", "model__dtype": "float32"}, 1,
     "model.attention.implementation='cudnn' needs model.dtype bfloat16 or float16 (got 'float32')"),
    ({"model__attention__implementation": "cudnn", "model__dtype": "bfloat16", "model__attention__sinks": True}, 1,
     "model.attention.implementation='cudnn' has no attention sinks"),
    ({"model__attention__implementation": "tokamax", "model__attention__sinks": True}, 1,
     "tokamax.dot_product_attention has no attention sinks (model.attention.sinks=True); set sinks=False"),
    ({"model__attention__implementation": "tokamax", "model__attention_types": ("dense", "mla")}, 1,
     "model.attention.implementation='tokamax' runs only on ['dense', 'sliding'] layers; the schedule also has "
     "['mla']"),
])
def test_invalid_configs_name_the_field_and_fix(fields, num_devices, message):
  with pytest.raises(ConfigError) as err:
    validate(_cfg(**fields), num_devices=num_devices)
  assert message in str(err.value)


def test_library_kernels_that_are_not_installed_are_named_with_the_extra(monkeypatch):
  from moejax.layers import library_kernels
  monkeypatch.setattr(library_kernels, "installed", lambda name: False)
  with pytest.raises(ConfigError) as err:
    validate(_cfg(model__attention__implementation="tokamax", model__mlp_types=("moe",), model__moe__backend="tokamax"),
             num_devices=1)
  assert "model.attention.implementation='tokamax' cannot run here: the tokamax package is not installed" \
      in str(err.value)
  assert "model.moe.backend='tokamax' cannot run here: the tokamax package is not installed" in str(err.value)
  assert str(err.value).count("pip install -e '.[kernels]'") == 2


def test_tokamax_on_a_gpu_without_pallas_dot_is_refused_with_the_reason(monkeypatch):
  """tokamax 0.0.12's GPU kernels call ``pallas.dot``, which JAX 0.11 removed (seen on an H100)."""
  from moejax.layers import library_kernels
  from moejax.layers.moe_dispatch import resolve_backend, unavailable_because
  assert library_kernels.pallas_has_dot() == (tuple(map(int, jax.__version__.split(".")[:2])) < (0, 11))
  monkeypatch.setattr(library_kernels, "installed", lambda name: True)
  monkeypatch.setattr(library_kernels, "pallas_has_dot", lambda: False)
  why = unavailable_because("tokamax", "gpu")
  assert why and "pallas.dot" in why and unavailable_because("tokamax", "cpu") is None
  assert resolve_backend("auto", True, False, "gpu") == "einsum"  # not tokamax


def test_all_problems_are_reported_at_once():
  with pytest.raises(ConfigError) as err:
    validate(_cfg(model__num_heads=3, optim__name="adamq"), num_devices=1)
  assert "model.num_heads" in str(err.value) and "optim.name" in str(err.value)


@pytest.mark.parametrize("spec", ["configs/tiny.py", "configs/tiny.py:copy", "configs/tiny.py:passkey",
                                  "configs/tiny.py:mqar", "configs/small.py",
                                  "configs/tiny_mhc_mtp.py", "configs/tiny_mhc_mtp.py:copy", "configs/tiny_moe.py",
                                  "configs/tiny_moe.py:v4", "configs/tiny_moe.py:qwen3", "configs/tiny_moe.py:mixtral",
                                  "configs/tiny_moe.py:expert_choice", "configs/tiny_moe.py:no_bias", "configs/tiny_hybrid.py",
                                  "configs/tiny_hybrid.py:v4,passkey", "configs/tiny_hybrid.py:dsa,warmup,copy",
                                  "configs/tiny_hybrid.py:mla,mqar", "configs/tiny_hybrid.py:mixed"])
def test_shipped_configs_are_valid(spec):
  validate(load_config(spec), num_devices=8)


def _moe_cfg(mesh=None, **moe):
  cfg = base_config()
  cfg.model.mlp_types = ("dense", "moe", "moe", "hash_moe")
  cfg.model.moe.update(moe)
  if mesh:
    cfg.mesh.update(mesh)
  return cfg


@pytest.mark.parametrize("moe,mesh,message", [
    (dict(top_k=9), None, "model.moe.top_k=9 exceeds model.moe.num_experts=8"),
    (dict(num_groups=3), None, "model.moe.num_groups=3 does not divide model.moe.num_experts=8"),
    (dict(num_groups=4, topk_groups=5), None, "model.moe.topk_groups=5 exceeds model.moe.num_groups=4"),
    (dict(router="switch"), None, "model.moe.router='switch' is unknown; known: "),
    (dict(router="expert_choice", score_bias=True), None, "router 'expert_choice' has no selection bias"),
    (dict(score="relu"), None, "model.moe.score='relu' is not one of"),
    (dict(dispatch="greedy"), None, "model.moe.dispatch='greedy' is not one of"),
    (dict(backend="megablox"), None, "model.moe.backend='megablox' is unknown; known: auto, einsum, onehot, ragged_dot"),
    (dict(backend="onehot"), None, "backend='onehot' does not support dispatch='dropless'"),
    (dict(backend="ragged_dot", dispatch="capacity"), None, "backend='ragged_dot' does not support dispatch='capacity'"),
    (dict(backend="ragged_dot"), dict(data=4, expert=2), "does not support expert parallelism (mesh.expert=2)"),
    (dict(num_experts=6, top_k=2), dict(data=2, expert=4), "mesh.expert=4 does not divide model.moe.num_experts=6"),
    (dict(swiglu_limit=-1.0), None, "model.moe.swiglu_limit=-1.0 must be >= 0"),
    (dict(capacity_factor=0.0), None, "model.moe.capacity_factor=0.0 must be > 0"),
])
def test_invalid_moe_configs_name_the_field_and_fix(moe, mesh, message):
  with pytest.raises(ConfigError) as err:
    validate(_moe_cfg(mesh, **moe), num_devices=8)
  assert message in str(err.value)


def test_moe_section_is_ignored_by_dense_models():
  cfg = base_config()
  cfg.model.moe.top_k = 99
  validate(cfg, num_devices=1)
