"""Config validation: every bad field is named with its fix, before compiling."""

import pytest

from moejax.config import ConfigError, base_config, load_config, validate


def _cfg(**fields):
  cfg = base_config()
  for dotted, value in fields.items():
    *sections, name = dotted.split("__")
    node = cfg
    for section in sections:
      node = node[section]
    node[name] = value
  return cfg


@pytest.mark.parametrize("fields,num_devices,message", [
    ({"model__num_heads": 3}, 1, "model.num_heads=3 does not divide model.d_model=128"),
    ({"model__num_kv_heads": 3}, 1, "model.num_kv_heads=3 does not divide model.num_heads=4"),
    ({"model__attention_types": ("dense", "dense")}, 1, "model.attention_types has 2 entries but model.num_layers=4"),
    ({"model__attention_types": ("flash",)}, 1, "unknown attention type 'flash'"),
    ({"model__mlp_types": ("nope",)}, 1, "unknown mlp type 'nope'"),
    ({"model__dtype": "fp8"}, 1, "model.dtype='fp8'"),
    ({"model__vocab_size": 100}, 1, "--config.model.vocab_size=259"),
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
    ({"mesh__data": 1, "mesh__fsdp": 8, "train__batch_size": 4}, 8, "must divide over mesh.data*mesh.fsdp=8"),
])
def test_invalid_configs_name_the_field_and_fix(fields, num_devices, message):
  with pytest.raises(ConfigError) as err:
    validate(_cfg(**fields), num_devices=num_devices)
  assert message in str(err.value)


def test_all_problems_are_reported_at_once():
  with pytest.raises(ConfigError) as err:
    validate(_cfg(model__num_heads=3, optim__name="adamq"), num_devices=1)
  assert "model.num_heads" in str(err.value) and "optim.name" in str(err.value)


@pytest.mark.parametrize("spec", ["configs/tiny.py", "configs/tiny.py:copy", "configs/tiny.py:passkey",
                                  "configs/tiny.py:mqar", "configs/small.py"])
def test_shipped_configs_are_valid(spec):
  validate(load_config(spec), num_devices=8)
