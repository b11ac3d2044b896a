"""Hugging Face interop: logits parity with transformers for every architecture
and several layer schedules, export that ``from_pretrained`` reads, exact round
trips, sharded checkpoints, meshes, and the errors for what is not supported.

The max logit differences are printed (``pytest -s``); docs/interop.md lists them.
"""

import json
import os

import chex
import jax
import numpy as np
import pytest

from moejax.config import ConfigError
from tests.interop import hf_models
from tests.oracle import require

torch = require("torch")
transformers = require("transformers")
require("safetensors")

from moejax.interop import hf  # noqa: E402

RTOL_OF_SCALE = 1e-4  # max |diff| <= 1e-4 * max |logit|
# The forward runs once per model: XLA's backend optimisations cost more (2x the
# compile time of these graphs on CPU) than they save; the numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _logits(model, variables, ids) -> np.ndarray:
  return np.asarray(jax.jit(model.apply).lower(variables, ids).compile(compiler_options=FAST_COMPILE)(variables, ids))


@pytest.fixture(scope="module", params=sorted(hf_models.CASES))
def converted(request, tmp_path_factory):
  """(case name, HF model, token ids, HF logits, checkpoint dir, moejax model, variables)."""
  name = request.param
  model, ids = hf_models.build(name)
  directory = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(directory)
  ours, variables = hf.load(directory)
  return name, model, ids, hf_models.logits(model, ids), directory, ours, variables


def _check_parity(name, expected, got, what):
  chex.assert_shape(got, expected.shape)
  scale, diff = float(np.abs(expected).max()), float(np.abs(got - expected).max())
  print(f"\n{what} {name}: max|logit diff| = {diff:.2e}, logit scale {scale:.2f}, ratio {diff / scale:.1e}")
  assert diff <= RTOL_OF_SCALE * scale, (name, diff, scale)


def test_load_matches_transformers_logits(converted):
  name, _, ids, expected, _, model, variables = converted
  got = _logits(model, variables, ids)
  assert got.dtype == np.float32
  _check_parity(name, expected, got, "hf.load")


def test_save_is_read_by_transformers_and_round_trips_exactly(converted, tmp_path):
  name, original, ids, expected, _, model, variables = converted
  hf.save(model, variables, str(tmp_path))
  reloaded = hf_models.from_pretrained(str(tmp_path))
  chex.assert_trees_all_equal({k: v.numpy() for k, v in reloaded.state_dict().items()},
                              {k: v.numpy() for k, v in original.state_dict().items()})
  prefix = min(ids.shape[1], 64)  # causal: the logits of a prefix are the prefix of the logits
  _check_parity(name, expected[:, :prefix], hf_models.logits(reloaded, ids[:, :prefix]), "hf.save -> from_pretrained")
  _, again = hf.load(str(tmp_path))
  chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(variables))


def test_sharded_checkpoints_both_ways(tmp_path):
  model, ids = hf_models.build("mixtral-plain")
  hf_dir, ours_dir = str(tmp_path / "hf"), str(tmp_path / "ours")
  model.save_pretrained(hf_dir, max_shard_size="40KB")
  assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
  ours, variables = hf.load(hf_dir)
  files = hf.save(ours, variables, ours_dir, max_shard_bytes=40_000)
  assert len(files) > 1 and os.path.exists(os.path.join(ours_dir, "model.safetensors.index.json"))
  reloaded = hf_models.from_pretrained(ours_dir)
  np.testing.assert_array_equal(hf_models.logits(reloaded, ids), hf_models.logits(model, ids))


def test_bfloat16_load_keeps_float32_state_and_round_trips_exactly(tmp_path):
  model, _ = hf_models.build("deepseek_v3-dense_first")
  model.save_pretrained(str(tmp_path / "hf"))
  ours, variables = hf.load(str(tmp_path / "hf"), dtype="bfloat16")
  params = variables["params"]
  assert params["embed"].dtype == jax.numpy.bfloat16 and params["layer_1"]["mlp"]["w_up"].dtype == jax.numpy.bfloat16
  assert variables["router_bias"]["layer_1"]["mlp"]["router"]["bias"].dtype == np.float32
  hf.save(ours, variables, str(tmp_path / "out"))
  assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"
  _, again = hf.load(str(tmp_path / "out"), dtype="bfloat16")
  chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(variables))


def test_deepseek_v4_release_spelling_loads_the_same(tmp_path):
  from safetensors.torch import load_file, save_file

  model, _ = hf_models.build("deepseek_v4-yarn_two_hash")
  model.save_pretrained(str(tmp_path / "hf"))
  _, expected = hf.load(str(tmp_path / "hf"))
  release = {}
  for name, t in load_file(str(tmp_path / "hf" / "model.safetensors")).items():
    name = name.replace("model.embed_tokens.", "embed.").replace("model.hc_head.hc_", "hc_head_")
    release[name.removeprefix("model.")] = t
  (tmp_path / "release").mkdir()
  save_file(release, str(tmp_path / "release" / "model.safetensors"))
  (tmp_path / "release" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  _, got = hf.load(str(tmp_path / "release"))
  chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(expected))


def test_load_onto_a_mesh_gives_the_same_logits(tmp_path, devices):
  from moejax.config import base_config
  from moejax.sharding import make_mesh

  model, ids = hf_models.build("mixtral-sliding")
  model.save_pretrained(str(tmp_path))
  mesh_cfg = base_config().mesh
  mesh_cfg.update(data=1, fsdp=2, tensor=2, expert=2)
  mesh = make_mesh(mesh_cfg, devices)
  ours, variables = hf.load(str(tmp_path), mesh=mesh)
  w_up = variables["params"]["layer_1"]["mlp"]["w_up"]  # [E=8, D, F]: expert x fsdp x tensor
  assert len(w_up.sharding.device_set) == 8 and not w_up.sharding.is_fully_replicated
  _check_parity("mixtral-sliding", hf_models.logits(model, ids),
                _logits(ours, variables, ids), "mesh 2x2x2")


def _config(name):
  return hf_models.config(name).to_dict()


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(some_new_switch=3), "some_new_switch=3"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "rope_type 'llama3'"),
])
def test_unsupported_configs_are_clear_errors(change, message):
  hf_config = dict(_config("qwen3_moe-dense_first"), **change)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
    hf.config_from_hf(hf_config)


def test_unknown_tensors_and_quantization_are_errors(tmp_path):
  model, _ = hf_models.build("mixtral-plain")
  model.save_pretrained(str(tmp_path))
  with open(tmp_path / "config.json") as f:
    hf_config = json.load(f)
  json.dump(dict(hf_config, quantization_config={"quant_method": "mxfp4"}), open(tmp_path / "config.json", "w"))
  with pytest.raises(NotImplementedError, match="mxfp4"):
    hf.load(str(tmp_path))
  json.dump(dict(hf_config, num_local_experts=2), open(tmp_path / "config.json", "w"))
  with pytest.raises(ConfigError, match="experts.2.w1.weight"):
    hf.load(str(tmp_path))


def test_deepseek_mtp_layers_are_dropped_with_a_notice(tmp_path, caplog):
  from safetensors.torch import load_file, save_file

  model, _ = hf_models.build("deepseek_v3-no_q_lora")
  model.save_pretrained(str(tmp_path))
  path = str(tmp_path / "model.safetensors")
  tensors = load_file(path)
  tensors["model.layers.2.eh_proj.weight"] = torch.zeros(32, 64)  # layer 2 of a 2-layer model: its MTP module
  save_file(tensors, path)
  hf.load(str(tmp_path))  # no error
  assert "dropping model.layers.2.eh_proj.weight: multi-token-prediction layer" in caplog.text


def test_block_fp8_checkpoints_are_dequantized_on_load(tmp_path):
  from safetensors.torch import load_file, save_file

  model, _ = hf_models.build("mixtral-plain")
  model.save_pretrained(str(tmp_path))
  path, name = str(tmp_path / "model.safetensors"), "model.layers.0.self_attn.q_proj.weight"
  tensors = load_file(path)
  w_fp8 = (tensors[name] * 50).to(torch.float8_e4m3fn)  # [32 out, 32 in], blocks of 16 x 16
  scale_inv = torch.rand(2, 2) + 0.5
  tensors.update({name: w_fp8, name + "_scale_inv": scale_inv})
  save_file(tensors, path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
  (tmp_path / "config.json").write_text(json.dumps(config))
  _, variables = hf.load(str(tmp_path))
  w = w_fp8.float().numpy()
  expected = np.array([[w[o, i] * scale_inv[o // 16, i // 16].item() for i in range(32)] for o in range(32)])
  got = np.asarray(variables["params"]["layer_0"]["attention"]["w_q"]).reshape(32, 32).T  # [D, H, Dh] -> torch [out, in]
  np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_configs_hf_cannot_express_are_clear_errors():
  from moejax.config import base_config

  cfg = hf.config_from_hf(_config("deepseek_v3-dense_first"))
  cfg.model.attention.sinks = True
  with pytest.raises(ConfigError, match="model.attention.sinks=True has no Hugging Face counterpart"):
    hf.config_to_hf(cfg)
  cfg = base_config()  # a dense GQA model without q/k norms: Llama; with them: Qwen3
  assert hf.config_to_hf(cfg)["model_type"] == "llama"
  cfg.model.attention.qk_norm = True
  assert hf.config_to_hf(cfg)["model_type"] == "qwen3"
  cfg.model.update(mlp_types=("dense", "moe", "moe", "moe"), moe=dict(score="softmax", renormalize=True))
  cfg.model.attention.qk_norm = False
  with pytest.raises(ConfigError, match="no Hugging Face architecture can express") as err:
    hf.config_to_hf(cfg)  # configs/tiny_moe.py:mixtral without a shared expert: Qwen3-MoE would need q/k norms
  assert "qwen3_moe: model.attention.qk_norm=False" in str(err.value)
  with pytest.raises(ConfigError, match="model.attention.qk_norm=False has no Hugging Face counterpart"):
    hf.config_to_hf(cfg, "qwen3_moe")


def test_config_round_trips_through_hf():
  for name in hf_models.CASES:
    cfg = hf.config_from_hf(_config(name))
    again = hf.config_from_hf(hf.config_to_hf(cfg))
    assert again.model.to_dict() == cfg.model.to_dict(), name


@pytest.mark.parametrize("name", sorted(hf_models.TESTER_CASES))
def test_transformers_tester_configs_load_with_parity_and_the_same_greedy_tokens(name, tmp_path, caplog):
  """transformers' own test configurations (vocab 99 < the byte tokenizer's 259, V3's top-8 beyond its kept
  groups, training-only dropout / jitter) load; logits agree to ~1e-5 and greedy decoding picks the same tokens."""
  from moejax.generate import sample

  model, ids = hf_models.build(name)
  model.save_pretrained(str(tmp_path))
  caplog.set_level("INFO", logger="moejax.interop.hf")
  ours, variables = hf.load(str(tmp_path))
  training_only = {k: v for k, v in hf_models.CASES[name][1].items()
                   if k in ("attention_dropout", "router_jitter_noise") and v}
  for field, value in training_only.items():
    assert f"ignoring {field}={value!r}: training-only" in caplog.text
  expected = hf_models.logits(model, ids)
  got = _logits(ours, variables, ids)
  scale, diff = float(np.abs(expected).max()), float(np.abs(got - expected).max())
  print(f"\ntester {name}: max|logit diff| = {diff:.2e}, logit scale {scale:.2f}")
  assert diff <= 1e-5 * scale, (name, diff, scale)

  new = 8
  with torch.no_grad():
    theirs = model.generate(torch.from_numpy(ids), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                            output_scores=True, return_dict_in_generate=True)
  gaps = [float(np.min(np.diff(np.sort(s.numpy(), -1)[:, -2:], axis=-1))) for s in theirs.scores]
  if min(gaps) < 1e-4:  # a near-tie between the two best tokens: either pick is right
    pytest.skip(f"{name}: top-2 logits within {min(gaps):.1e} at some step")
  mine = sample(ours, variables, ids, np.full((ids.shape[0],), ids.shape[1]), rng=jax.random.key(0),
                max_new_tokens=new, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(mine.tokens_BxN), theirs.sequences[:, ids.shape[1]:].numpy())
