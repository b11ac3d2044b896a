"""Parity with the transformers reference modules (DeepSeek-V3 MLA, V3.2 DSA, V4 attention).

Each HF attention layer gets random weights, which are mapped onto moejax's
parameter names as documented in docs/attention.md; both run on the same
input. Skipped where torch / transformers are not installed.

The indexers use 8 heads: with very few heads the ReLU scores of several keys
are often exactly 0, and torch.topk orders such ties in an unspecified way
(lax.top_k: lowest index first) -- equally good selections, different outputs.
"""

import numpy as np
import pytest

from moejax.layers.attention import ATTENTION
from tests.helpers import tiny_model_cfg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T, D, H = 2, 13, 32, 4


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


def _run(attention_type, attention_cfg, params, x, norm_eps=1e-6):
  cfg = tiny_model_cfg(d_model=D, num_heads=H, norm_eps=norm_eps, attention=attention_cfg)
  attn = ATTENTION.get(attention_type)(cfg=cfg)
  pos, seg = np.tile(np.arange(T), (B, 1)), np.ones((B, T), np.int32)
  return np.asarray(attn.apply({"params": params}, x, pos, seg))


def _mla_params(hf, h, r_q, dn, dr, dv, r):
  p = {"w_kv_a": _np(hf.kv_a_proj_with_mqa.weight).T, "kv_a_norm": {"scale": _np(hf.kv_a_layernorm.weight)},
       "w_kv_b": _np(hf.kv_b_proj.weight).T.reshape(r, h, dn + dv), "w_o": _np(hf.o_proj.weight).T.reshape(h, dv, D)}
  if r_q:
    p.update(w_q_a=_np(hf.q_a_proj.weight).T, q_a_norm={"scale": _np(hf.q_a_layernorm.weight)},
             w_q_b=_np(hf.q_b_proj.weight).T.reshape(r_q, h, dn + dr))
  else:
    p["w_q"] = _np(hf.q_proj.weight).T.reshape(D, h, dn + dr)
  return p


MLA_DIMS = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 1.0,
        "mscale_all_dim": 1.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("q_lora_rank,interleave,yarn", [(16, True, True), (None, False, False)])
def test_mla_equals_deepseek_v3_attention(q_lora_rank, interleave, yarn):
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3
  cfg = transformers.DeepseekV3Config(
      hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora_rank, rope_interleave=interleave,
      rope_parameters=YARN if yarn else {"rope_type": "default", "rope_theta": 10000.0},
      max_position_embeddings=32, **MLA_DIMS)
  cfg._attn_implementation = "eager"
  hf = hf_v3.DeepseekV3Attention(cfg, 0).eval()
  _randomize(hf)
  x = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
  xt = torch.from_numpy(x)
  position_embeddings = hf_v3.DeepseekV3RotaryEmbedding(cfg)(xt, torch.arange(T)[None].expand(B, T))
  expected = _np(hf(xt, position_embeddings, _mask())[0])
  ours = dict(MLA_DIMS, q_lora_rank=q_lora_rank or 0, rope_layout="interleave" if interleave else "half")
  if yarn:
    ours["yarn"] = dict(factor=4.0, original_max_len=8, mscale=1.0, mscale_all_dim=1.0)
  got = _run("mla", ours, _mla_params(hf, H, q_lora_rank, 8, 4, 8, 16), x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("topk", [3, 13])
def test_dsa_equals_deepseek_v32_attention(topk):
  from transformers.models.deepseek_v32 import modeling_deepseek_v32 as hf_v32
  cfg = transformers.DeepseekV32Config(
      hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=16, index_topk=topk,
      index_head_dim=8, index_n_heads=8, max_position_embeddings=32,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **MLA_DIMS)
  cfg._attn_implementation = "eager"
  hf = hf_v32.DeepseekV32Attention(cfg, 0).eval()
  _randomize(hf)
  x = np.random.default_rng(1).normal(size=(B, T, D)).astype(np.float32)
  xt = torch.from_numpy(x)
  position_ids = torch.arange(T)[None].expand(B, T)
  position_embeddings = hf_v32.DeepseekV32RotaryEmbedding(cfg)(xt, position_ids)
  expected = _np(hf(xt, position_embeddings, _mask(), position_ids=position_ids)[0])
  params = _mla_params(hf, H, 16, 8, 4, 8, 16)
  idx = hf.indexer
  params["indexer"] = {"w_q_b": _np(idx.wq_b.weight).T.reshape(16, 8, 8), "w_k": _np(idx.wk.weight).T,
                       "k_norm": {"scale": _np(idx.k_norm.weight), "bias": _np(idx.k_norm.bias)},
                       "w_weights": _np(idx.weights_proj.weight).T}
  ours = dict(MLA_DIMS, q_lora_rank=16, rope_layout="interleave", index_topk=topk, index_heads=8, index_head_dim=8,
              indexer_stage="off")
  np.testing.assert_allclose(_run("dsa", ours, params, x), expected, rtol=1e-4, atol=1e-5)


def _v4_compressor_params(c, dh):
  return {"w_kv": _np(c.kv_proj.weight).T, "w_gate": _np(c.gate_proj.weight).T,
          "position_bias": _np(c.position_bias), "kv_norm": {"scale": _np(c.kv_norm.weight)}}


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_v4_types_equal_deepseek_v4_attention(layer):
  from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4
  dh, g, ro, window = 8, 2, 8, 3
  cfg = transformers.DeepseekV4Config(
      vocab_size=64, hidden_size=D, num_hidden_layers=3, num_attention_heads=H, head_dim=dh, q_lora_rank=16,
      partial_rotary_factor=0.5, mlp_layer_types=["moe"] * 3, sliding_window=window, o_groups=g, o_lora_rank=ro,
      layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
      compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
      index_n_heads=8, index_head_dim=8, index_topk=3, compress_rope_theta=160000.0,
      rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
      max_position_embeddings=64, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
  cfg._attn_implementation = "eager"
  hf = hf_v4.DeepseekV4Attention(cfg, layer).eval()
  _randomize(hf)
  x = np.random.default_rng(2).normal(size=(B, T, D)).astype(np.float32)
  xt = torch.from_numpy(x)
  position_ids = torch.arange(T)[None].expand(B, T)
  rotary = hf_v4.DeepseekV4RotaryEmbedding(cfg)
  position_embeddings = {k: rotary(xt, position_ids, layer_type=k) for k in ("main", "compress")}
  expected = _np(hf(xt, position_embeddings, position_ids, _mask(window))[0])

  params = {"w_q_a": _np(hf.q_a_proj.weight).T, "q_a_norm": {"scale": _np(hf.q_a_norm.weight)},
            "w_q_b": _np(hf.q_b_proj.weight).T.reshape(16, H, dh), "w_kv": _np(hf.kv_proj.weight).T,
            "kv_norm": {"scale": _np(hf.kv_norm.weight)}, "sinks": _np(hf.sinks),
            "w_o_a": _np(hf.o_a_proj.weight).reshape(g, ro, -1).transpose(0, 2, 1),
            "w_o_b": _np(hf.o_b_proj.weight).T.reshape(g, ro, D)}
  if hf.compressor is not None:
    params["compressor"] = _v4_compressor_params(hf.compressor, dh)
  if layer == 1:
    idx = hf.compressor.indexer
    params["indexer"] = {**_v4_compressor_params(idx, 8), "w_q_b": _np(idx.q_b_proj.weight).T.reshape(16, 8, 8),
                         "w_weights": _np(idx.scorer.weights_proj.weight).T}
  ours = dict(q_lora_rank=16, window=window, o_groups=g, o_lora_rank=ro, rope_dim=4, rope_layout="interleave",
              csa_ratio=2, hca_ratio=4, index_heads=8, index_head_dim=8, index_topk=3, indexer_stage="off",
              compress_rope_theta=160000.0, compress_yarn=dict(factor=4.0, original_max_len=16, attention_factor=1.0))
  got = _run(("swa", "csa", "hca")[layer], ours, params, x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
