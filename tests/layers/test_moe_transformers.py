"""The router options express exactly transformers' MoE blocks (DeepSeek-V3,
DeepSeek-V4 incl. hash routing and the swiglu clamp, Qwen3-MoE, Mixtral):
same outputs from the same weights. The weights and the ``model.moe`` fields
come through the library's HF mapping (``moejax.interop.hf.from_transformers``),
so this test also pins the config translation to the recipes below."""

import chex
import jax
import numpy as np
import pytest

from moejax.layers.mlp import MLP
from tests.layers.test_moe import D, E, F
from tests.oracle import require

torch = require("torch")
transformers = require("transformers")

B, T, V = 2, 5, 320  # V >= the byte tokenizer, so the converted config validates


def _model(model):
  """(one-layer transformers causal LM, moejax mlp type, expected model.moe fields)."""
  common = dict(hidden_size=D, num_experts_per_tok=2, vocab_size=V, num_hidden_layers=1, num_attention_heads=2)
  if model == "deepseek_v3":
    cfg = transformers.DeepseekV3Config(
        moe_intermediate_size=F, n_routed_experts=E, n_group=4, topk_group=2, n_shared_experts=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0, q_lora_rank=8, kv_lora_rank=8,
        qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, num_key_value_heads=2, **common)
    return cfg, "moe", dict(score="sigmoid", score_bias=True, num_groups=4, topk_groups=2, num_shared=2,
                            renormalize=True, routed_scale=2.5)
  if model.startswith("deepseek_v4"):
    hashed = model.endswith("hash")
    cfg = transformers.DeepseekV4Config(
        moe_intermediate_size=F, n_routed_experts=E, swiglu_limit=0.7, routed_scaling_factor=1.5, head_dim=8,
        partial_rotary_factor=0.5,
        q_lora_rank=8, o_groups=2, o_lora_rank=4, index_n_heads=2, index_head_dim=8, layer_types=["sliding_attention"],
        mlp_layer_types=["hash_moe" if hashed else "moe"], **common)
    return cfg, "hash_moe" if hashed else "moe", dict(score="sqrtsoftplus", score_bias=True, num_shared=1,
                                                      renormalize=True, routed_scale=1.5, swiglu_limit=0.7)
  if model.startswith("qwen3_moe"):
    norm = model.endswith("norm")
    cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=F, num_experts=E, norm_topk_prob=norm,
                                      num_key_value_heads=1, **common)
    return cfg, "moe", dict(score="softmax", renormalize=norm, num_shared=0)
  cfg = transformers.MixtralConfig(intermediate_size=F, num_local_experts=E, num_key_value_heads=1, **common)
  return cfg, "moe", dict(score="softmax", renormalize=True, num_shared=0)


def _layer_variables(variables):
  """The MoE layer's variables inside the converted model's tree."""
  return {col: tree["layer_0"]["mlp"] for col, tree in variables.items() if "mlp" in tree.get("layer_0", {})}


@pytest.mark.parametrize("model", ["deepseek_v3", "deepseek_v4", "deepseek_v4_hash", "qwen3_moe", "qwen3_moe_norm",
                                   "mixtral"])
def test_moe_block_matches_transformers(model):
  from moejax.interop import hf

  torch.manual_seed(0)
  cfg, mlp_type, fields = _model(model)
  full = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  block = full.model.layers[0].mlp
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, param in block.named_parameters():
      param.copy_(torch.from_numpy(rng.normal(size=param.shape).astype(np.float32) * (0.3 if "gate" in name else 1.0)))
    for name, buf in block.named_buffers():
      if "bias" in name:
        buf.copy_(torch.from_numpy(rng.normal(size=buf.shape).astype(np.float32) * 0.3))
      if "tid2eid" in name:
        buf.copy_(torch.from_numpy(np.stack([rng.permutation(E)[:2] for _ in range(V)])))
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  ids = rng.integers(0, V, size=(B, T))
  with torch.no_grad():
    args = (torch.from_numpy(x),) + ((torch.from_numpy(ids),) if mlp_type == "hash_moe" else ())
    expected = block(*args).numpy()

  converted, variables = hf.from_transformers(full)
  got_fields = {k: converted.cfg.moe[k] for k in fields}
  assert got_fields == fields, "the HF config no longer translates to this router recipe"
  layer = MLP.get(mlp_type)(cfg=converted.cfg)
  got = jax.jit(layer.apply)(_layer_variables(variables), x, ids)
  chex.assert_trees_all_close(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
