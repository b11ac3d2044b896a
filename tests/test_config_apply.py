"""moejax.config_apply.apply_config: nested and dotted updates onto the schema."""

import json

import ml_collections
import pytest

from moejax.config import ConfigError, base_config
from moejax.config_apply import apply_config


def test_nested_and_dotted_updates_with_coercion():
  cfg = base_config()
  saved = json.loads(json.dumps({"model": {"attention_types": ["dense", "sliding"], "num_layers": 2},
                                 "optim.b2": 1, "train.steps": 7}))
  assert apply_config(cfg, saved) is cfg
  assert cfg.model.attention_types == ("dense", "sliding")  # JSON list -> the schema's tuple
  assert cfg.model.num_layers == 2 and cfg.train.steps == 7
  assert cfg.optim.b2 == 1.0 and type(cfg.optim.b2) is float  # int into a float field


def test_a_saved_config_round_trips():
  cfg = base_config()
  cfg.model.attention_types = ("sliding", "dense")
  cfg.optim.name = "muon"
  restored = apply_config(base_config(), json.loads(json.dumps(cfg.to_dict())))
  assert restored.to_dict() == cfg.to_dict()


def test_free_mapping_takes_new_entries():
  cfg = apply_config(base_config(), {"distill": {"domains": {"code": {"weight": 2.0, "data": {"source": "copy"}}}}})
  assert isinstance(cfg.distill.domains.code, ml_collections.ConfigDict)
  assert cfg.distill.domains.code.data.source == "copy" and cfg.distill.domains.code.weight == 2.0


@pytest.mark.parametrize("updates, message", [
    ({"model.num_layer": 2}, "model.num_layer is not a config field; did you mean model.num_layers"),
    ({"optim": {"nmae": "adamw"}}, "optim.nmae is not a config field; did you mean optim.name?"),
    ({"modle": {}}, "modle is not a config field; did you mean model?"),
    ({"model.d_model.x": 1}, "model.d_model is a field, not a section"),
    ({"model.num_layers": "two"}, "model.num_layers='two' has the wrong type: the schema holds int"),
])
def test_errors_name_the_field_and_the_fix(updates, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
    apply_config(base_config(), updates)


def test_prefix_and_source_in_messages():
  with pytest.raises(ConfigError, match=r"^runs/x/config.json: model.vocab_sise is not a config field"):
    apply_config(base_config().model, {"vocab_sise": 3}, prefix="model", source="runs/x/config.json")


def _saved_workdir(tmp_path):
  cfg = base_config()
  cfg.model.update(num_layers=3, attention_types=("sliding", "dense", "dense"))
  cfg.distill.domains.code = ml_collections.ConfigDict(dict(weight=2.0, data=dict(source="copy")))
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
  return cfg


def test_the_hf_workdir_config_and_a_distill_teacher_read_a_saved_config(tmp_path):
  from moejax.distill.config import domain, teacher_config
  from moejax.interop.hf import workdir_config

  saved = _saved_workdir(tmp_path)
  assert workdir_config(str(tmp_path)).to_dict() == saved.to_dict()
  student = base_config()
  student.distill.domains.mine = domain("stdlib", teacher_workdir=str(tmp_path))
  assert teacher_config(student, "mine").to_dict() == saved.to_dict()


def test_a_saved_config_with_an_unknown_field_names_the_file(tmp_path):
  from moejax.interop.hf import workdir_config

  (tmp_path / "config.json").write_text(json.dumps({"model": {"num_layers": 2, "n_layers": 2}}))
  with pytest.raises(ConfigError, match=f"^{tmp_path}/config.json: model.n_layers is not a config field"):
    workdir_config(str(tmp_path))


def test_a_free_mapping_takes_several_new_entries():
  """distill.domains from a saved config.json with two domains (a distillation teacher's workdir): the
  second entry must not be refused because the first one made the mapping non-empty."""
  saved = {"distill": {"domains": {"asyncio": {"weight": 1.0}, "copy": {"weight": 2.0, "data": {"source": "copy"}}}}}
  cfg = apply_config(base_config(), saved)
  assert list(cfg.distill.domains) == ["asyncio", "copy"] and cfg.distill.domains.copy.weight == 2.0
  apply_config(cfg, {"distill.domains.code": {"weight": 3.0}})  # a dotted key adds one more
  assert cfg.distill.domains.code.weight == 3.0
  with pytest.raises(ConfigError, match="distill.weight is not a config field"):
    apply_config(cfg, {"distill": {"weight": 1.0}})  # distill itself is not free
