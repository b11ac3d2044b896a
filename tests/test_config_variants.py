"""moejax.config_variants.parse_arg: the ``configs/file.py:key=value,flag,word`` grammar."""

import pytest

from moejax.config import ConfigError, load_config
from moejax.config_variants import one_of, parse_arg

OPTIONS = dict(schedule=one_of("sliding", "v4"), stage=one_of("warmup", "sparse", default="sparse"),
               t=1024, lr=1e-3, name="x", reverse=False)


@pytest.mark.parametrize("arg, expected", [
    (None, dict(schedule="sliding", stage="sparse", t=1024, lr=1e-3, name="x", reverse=False)),
    ("", dict(schedule="sliding", stage="sparse", t=1024, lr=1e-3, name="x", reverse=False)),
    ("v4,warmup", dict(schedule="v4", stage="warmup", t=1024, lr=1e-3, name="x", reverse=False)),
    ("schedule=v4, t=262144,reverse", dict(schedule="v4", stage="sparse", t=262144, lr=1e-3, name="x", reverse=True)),
    ("lr=3e-4,name=abc,reverse=false", dict(schedule="sliding", stage="sparse", t=1024, lr=3e-4, name="abc",
                                            reverse=False)),
])
def test_parse_arg(arg, expected):
  parsed = parse_arg(arg, **OPTIONS)
  assert parsed.to_dict() == expected
  assert type(parsed.t) is int and type(parsed.lr) is float


@pytest.mark.parametrize("arg, message", [
    ("v5", "'v5' is neither an option value nor a flag; known: schedule: one of sliding, v4"),
    ("depth=2", "unknown option 'depth'"),
    ("t=1k", "t must be of type int (default 1024)"),
    ("schedule=v5", "schedule is one of sliding, v4"),
    ("reverse=maybe", "reverse is a flag; give true or false"),
    ("v4,sliding", "sets 'schedule' twice"),
])
def test_bad_variants_name_the_item_and_the_known_options(arg, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    parse_arg(arg, **OPTIONS)


def test_a_value_of_two_options_needs_its_key():
  with pytest.raises(ConfigError, match="write a=x"):
    parse_arg("x", a=one_of("x", "y"), b=one_of("z", "x"))
  assert parse_arg("b=x", a=one_of("x", "y"), b=one_of("z", "x")).b == "x"


def test_no_options_rejects_any_variant():
  with pytest.raises(ConfigError, match="this config takes no variant"):
    parse_arg("big")


@pytest.mark.parametrize("spec, field, value", [
    ("configs/tiny.py:copy", "data.source", "copy"),
    ("configs/tiny.py:data=mqar", "data.source", "mqar"),
    ("configs/tiny_hybrid.py:dsa,warmup,copy", "model.attention.indexer_stage", "warmup"),
    ("configs/tiny_hybrid.py:schedule=mla,data=mqar", "model.attention_types", ("mla",) * 6),
    ("configs/tiny_moe.py:recipe=qwen3", "model.moe.load_balance_weight", 0.01),
    ("configs/v4_1m.py:t=4096", "data.seq_len", 4096),
    ("configs/v4_tiny.py:stdlib", "data.source", "stdlib"),
    ("configs/distill_tiny.py:on_policy,labels", "distill.mode", "on_policy"),
    ("configs/distill_tiny.py:on_policy,labels", "distill.alpha", 1.0),
    ("configs/tiny_mhc_mtp.py:passkey", "data.source", "passkey"),
])
def test_config_files_read_their_variants(spec, field, value):
  node = load_config(spec)
  for part in field.split("."):
    node = node[part]
  assert node == value


@pytest.mark.parametrize("spec", ["configs/tiny.py:files", "configs/small.py:big", "configs/tiny_moe.py:v5",
                                  "configs/v4_1m.py:T=4096", "configs/distill_tiny.py:forward"])
def test_config_files_reject_unknown_variants(spec):
  with pytest.raises(ConfigError, match="known|no variant"):
    load_config(spec)
