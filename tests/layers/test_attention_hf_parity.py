"""Parity with the transformers reference modules (DeepSeek-V3 MLA, V3.2 DSA, V4 attention).

Each HF attention layer (layer i of a tiny causal LM) gets random weights,
which reach moejax's parameter names through the library's HF mapping
(``moejax.interop.hf.from_transformers``, the code ``hf.load`` runs), and its
config through the library's config translation; both run on the same input.
Skipped where torch / transformers are not installed, except under CI=true, where that fails (tests/oracle.py).

The indexers use 8 heads: with very few heads the ReLU scores of several keys
are often exactly 0, and torch.topk orders such ties in an unspecified way
(lax.top_k: lowest index first) -- equally good selections, different outputs.
"""

import numpy as np
import pytest

from moejax.config import expand_schedule
from moejax.layers.attention import ATTENTION
from tests.oracle import require

torch = require("torch")
transformers = require("transformers")

B, T, D, H = 2, 13, 32, 4
SMALL_MOE = dict(vocab_size=320, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_group=1,
                 topk_group=1)


def _randomize(module, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
      p.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else 0.3 * noise)


def _np(t):
  return t.detach().to(torch.float32).numpy()


def _mask(window=0):
  t, s = np.arange(T)[:, None], np.arange(T)[None]
  ok = (s <= t) & ((t - s < window) if window else True)
  return torch.from_numpy(np.where(ok, 0.0, -np.inf).astype(np.float32))[None, None].expand(B, 1, T, T)


def _layer(config, layer, seed=0):
  """(the HF attention module of ``layer``, randomized; a function running moejax's on the same weights)."""
  from moejax.interop import hf

  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  full = transformers.AutoModelForCausalLM.from_config(config).eval()
  module = full.model.layers[layer].self_attn
  _randomize(module, seed)
  model, variables = hf.from_transformers(full)
  ours = ATTENTION.get(expand_schedule(model.cfg.attention_types, model.cfg.num_layers)[layer])(cfg=model.cfg)
  params = variables["params"][f"layer_{layer}"]["attention"]

  def run(x):
    pos, seg = np.tile(np.arange(T), (B, 1)), np.ones((B, T), np.int32)
    return np.asarray(ours.apply({"params": params}, x, pos, seg))

  return module, run


MLA_DIMS = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0,
        "mscale_all_dim": 1.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("q_lora_rank,interleave,yarn", [(16, True, True), (None, False, False)])
def test_mla_equals_deepseek_v3_attention(q_lora_rank, interleave, yarn):
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3
  cfg = transformers.DeepseekV3Config(
      hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora_rank, rope_interleave=interleave,
      rope_parameters=YARN if yarn else {"rope_type": "default", "rope_theta": 10000.0}, num_hidden_layers=1,
      first_k_dense_replace=0, max_position_embeddings=32, **MLA_DIMS, **SMALL_MOE)
  hf, run = _layer(cfg, 0)
  x = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
  xt = torch.from_numpy(x)
  position_embeddings = hf_v3.DeepseekV3RotaryEmbedding(cfg)(xt, torch.arange(T)[None].expand(B, T))
  expected = _np(hf(xt, position_embeddings, _mask())[0])
  np.testing.assert_allclose(run(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("topk", [3, 13])
def test_dsa_equals_deepseek_v32_attention(topk):
  from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32
  cfg = transformers.DeepseekV32Config(
      hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=16, index_topk=topk,
      index_head_dim=8, index_n_heads=8, max_position_embeddings=32, num_hidden_layers=1, first_k_dense_replace=0,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **MLA_DIMS, **SMALL_MOE)
  hf, run = _layer(cfg, 0)
  x = np.random.default_rng(1).normal(size=(B, T, D)).astype(np.float32)
  xt = torch.from_numpy(x)
  position_ids = torch.arange(T)[None].expand(B, T)
  position_embeddings = hf_v32.DeepseekV32RotaryEmbedding(cfg)(xt, position_ids)
  expected = _np(hf(xt, position_embeddings, _mask(), position_ids=position_ids)[0])
  np.testing.assert_allclose(run(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_v4_types_equal_deepseek_v4_attention(layer):
  from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4
  dh, g, ro, window = 8, 2, 8, 3
  cfg = transformers.DeepseekV4Config(
      hidden_size=D, num_hidden_layers=3, num_attention_heads=H, head_dim=dh, q_lora_rank=16,
      partial_rotary_factor=0.5, mlp_layer_types=["moe"] * 3, sliding_window=window, o_groups=g, o_lora_rank=ro,
      layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
      compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
      index_n_heads=8, index_head_dim=8, index_topk=3, compress_rope_theta=160000.0,
      rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
      max_position_embeddings=64, **{k: v for k, v in SMALL_MOE.items() if k not in ("n_group", "topk_group")})
  hf, run = _layer(cfg, layer)
  x = np.random.default_rng(2).normal(size=(B, T, D)).astype(np.float32)
  xt = torch.from_numpy(x)
  position_ids = torch.arange(T)[None].expand(B, T)
  rotary = hf_v4.DeepseekV4RotaryEmbedding(cfg)
  position_embeddings = {k: rotary(xt, position_ids, layer_type=k) for k in ("main", "compress")}
  expected = _np(hf(xt, position_embeddings, position_ids, _mask(window))[0])
  np.testing.assert_allclose(run(x), expected, rtol=1e-4, atol=1e-5)
