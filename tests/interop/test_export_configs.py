"""Every shipped config (``configs/*.py`` and its variants) either exports to a
Hugging Face architecture that ``from_pretrained`` runs with the same logits,
or is refused with an error naming the field that rules each architecture out,
and is listed as not exportable in docs/interop.md.

Models are shrunk (layers / width) and exported from their init parameters plus
noise (train 0 steps): parity does not depend on training.
"""

import glob
import os
import re

import jax
import numpy as np
import pytest

from moejax import cli
from moejax.config import ConfigError, load_config
from tests.interop import hf_models
from moejax.interop import hf
from tests.interop.test_hf import RTOL_OF_SCALE
from tests.oracle import require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=96)
# spec -> (HF model_type, model.* overrides that shrink it). The data variants of a config
# (tiny.py:copy/passkey/mqar, v4_tiny.py:stdlib/mqar/copy) share its model.
EXPORTABLE = {
    "configs/tiny.py": ("llama", SMALL),
    "configs/small.py": ("llama", dict(SMALL, num_heads=6, d_model=96, vocab_size=320, dtype="float32")),
    "configs/tiny_moe.py": ("glm4_moe", dict(SMALL, mlp_types=("dense", "moe"), moe=dict(expert_ffn_dim=32))),
    "configs/tiny_moe.py:no_bias": ("glm4_moe", dict(SMALL, mlp_types=("dense", "moe"), moe=dict(expert_ffn_dim=32))),
    # 16 index heads: with 4, ReLU-gated index scores tie at 0 across the top-k boundary (docs/interop.md).
    "configs/v4_tiny.py": ("deepseek_v4", dict(attention=dict(index_heads=16))),
}
# Too large to build on CPU (284B parameters): its architecture mapping is checked, and its shape
# is v4_tiny's, whose parity is tested above.
MAPPING_ONLY = {"configs/v4_flash.py": "deepseek_v4"}
# spec -> the field each message must name (the one that rules out the closest architecture).
NOT_EXPORTABLE = {
    "configs/tiny_moe.py:v4": "model.mlp_types=('dense', 'hash_moe', 'moe', 'moe')",
    "configs/tiny_moe.py:qwen3": "qwen3_moe: model.attention.qk_norm=False",
    "configs/tiny_moe.py:mixtral": "qwen3_moe: model.attention.qk_norm=False",
    "configs/tiny_moe.py:expert_choice": "model.moe.score='softmax'",
    "configs/tiny_hybrid.py:sliding": "qwen3: model.attention.qk_norm=False",
    "configs/tiny_hybrid.py:v4": "deepseek_v4: model.num_kv_heads=2",
    "configs/tiny_hybrid.py:mla": "deepseek_v3: model.attention.sinks=True",
    "configs/tiny_hybrid.py:dsa": "deepseek_v32: model.attention.sinks=True",
    "configs/tiny_hybrid.py:mixed": "model.attention_types=('swa', 'csa', 'hca', 'dsa', 'mla', 'sliding')",
    "configs/tiny_mhc_mtp.py": "llama: model.hc.streams=4",
    "configs/v4_1m.py": "deepseek_v4: model.hc.streams=1",
    "configs/distill_tiny.py": "qwen3_moe: model.attention.qk_norm=False",
}


def test_every_shipped_config_is_classified():
  files = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  covered = {spec.partition(":")[0] for spec in [*EXPORTABLE, *NOT_EXPORTABLE, *MAPPING_ONLY]}
  assert files == covered


@pytest.mark.parametrize("spec", sorted(MAPPING_ONLY))
def test_large_shipped_config_maps_to_its_architecture(spec):
  assert hf.config_to_hf(load_config(os.path.join(ROOT, spec)))["model_type"] == MAPPING_ONLY[spec]


def test_docs_list_every_config_that_does_not_export():
  text = open(os.path.join(ROOT, "docs", "interop.md")).read()
  for spec in NOT_EXPORTABLE:
    assert f"`{spec}`" in text, spec
  for spec, (model_type, _) in EXPORTABLE.items():
    assert re.search(rf"`{re.escape(spec)}`[^\n]*`{model_type}`", text), spec


def _model(spec: str, overrides: dict):
  from moejax.models.transformer import build_model

  cfg = load_config(os.path.join(ROOT, spec))
  cfg.unlock()
  for key, value in overrides.items():
    if isinstance(value, dict):
      cfg.model[key].update(value)
    else:
      cfg.model[key] = value
  model = build_model(cfg.model)
  ids = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(2, 80))
  variables = model.init(jax.random.key(0), ids)
  rng = np.random.default_rng(1)  # every float leaf moved off its init (ones, zeros, identical rows)
  noisy = jax.tree.map(lambda v: v + rng.normal(scale=0.2, size=v.shape).astype(v.dtype)
                       if jax.numpy.issubdtype(v.dtype, jax.numpy.floating) else v, jax.device_get(variables))
  return cfg, model, noisy, ids


@pytest.mark.parametrize("spec", sorted(EXPORTABLE))
def test_shipped_config_exports_with_from_pretrained_parity(spec, tmp_path):
  require("torch"), require("transformers")
  model_type, overrides = EXPORTABLE[spec]
  cfg, model, variables, ids = _model(spec, overrides)
  assert hf.config_to_hf(cfg)["model_type"] == model_type
  hf.save(model, variables, str(tmp_path))
  theirs = hf_models.logits(hf_models.from_pretrained(str(tmp_path)), ids)
  ours = model.apply({k: v for k, v in variables.items()}, ids)
  ours = np.asarray(ours[0] if isinstance(ours, tuple) else ours)
  scale, diff = float(np.abs(theirs).max()), float(np.abs(ours - theirs).max())
  print(f"\nexport {spec} -> {model_type}: max|logit diff| = {diff:.2e}, logit scale {scale:.2f}")
  assert diff <= RTOL_OF_SCALE * scale, (spec, diff, scale)


@pytest.mark.parametrize("spec", sorted(NOT_EXPORTABLE))
def test_shipped_config_that_cannot_export_names_the_field(spec):
  cfg = load_config(os.path.join(ROOT, spec))
  with pytest.raises(ConfigError, match="no Hugging Face architecture can express") as err:
    hf.config_to_hf(cfg)
  assert NOT_EXPORTABLE[spec] in str(err.value)
  assert "--model-type" in str(err.value)


TRAIN_FAST = ["--config.train.steps=1", "--config.train.batch_size=8", "--config.data.seq_len=32",
              "--config.train.eval_every=0", "--config.train.log_every=1", "--config.train.checkpoint_every=1",
              "--config.model.num_layers=2", "--config.model.d_model=64", "--config.model.ffn_dim=96"]


@pytest.mark.parametrize("spec,extra,model_type", [
    pytest.param("configs/tiny.py", [], "llama", marks=pytest.mark.slow),  # exported by hf.save above too
    ("configs/tiny_moe.py", ["--config.model.mlp_types=('dense','moe')", "--config.model.moe.expert_ffn_dim=32"],
     "glm4_moe"),
])
def test_cli_convert_to_hf_of_a_trained_tiny_model(spec, extra, model_type, tmp_path, capsys):
  require("torch"), require("transformers")
  workdir, out = str(tmp_path / "w"), str(tmp_path / "hf")
  assert cli.main(["train", "--config", os.path.join(ROOT, spec), "--workdir", workdir, *TRAIN_FAST, *extra]) == 0
  assert cli.main(["convert", "--to-hf", workdir, "--out", out]) == 0
  assert hf_models.from_pretrained(out).config.model_type == model_type
  capsys.readouterr()
  if model_type == "glm4_moe":  # forcing an architecture that cannot express it: exit 2 naming the field
    assert cli.main(["convert", "--to-hf", workdir, "--out", str(tmp_path / "x"), "--model-type", "qwen3_moe"]) == 2
    err = capsys.readouterr().err
    assert "model.attention.qk_norm=False" in err and "RuntimeError" not in err
