"""The router options express exactly transformers' MoE blocks (DeepSeek-V3,
DeepSeek-V4 incl. hash routing and the swiglu clamp, Qwen3-MoE, Mixtral):
same outputs from the same weights, mapped onto moejax's parameter layout."""

import chex
import jax
import numpy as np
import pytest

from tests.layers.test_moe import D, E, F, init_moe, moe_cfg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T, V = 2, 5, 48


def _block(model):
  """(transformers block, moejax mlp type, model.moe fields) for one architecture."""
  common = dict(hidden_size=D, num_experts_per_tok=2, vocab_size=V)
  if model == "deepseek_v3":
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    cfg = m.DeepseekV3Config(moe_intermediate_size=F, n_routed_experts=E, n_group=4, topk_group=2, n_shared_experts=2,
                             routed_scaling_factor=2.5, norm_topk_prob=True, **common)
    return m.DeepseekV3MoE(cfg), "moe", dict(score="sigmoid", score_bias=True, num_groups=4, topk_groups=2,
                                             num_shared=2, renormalize=True, routed_scale=2.5)
  if model.startswith("deepseek_v4"):
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m
    hashed = model.endswith("hash")
    cfg = m.DeepseekV4Config(moe_intermediate_size=F, n_routed_experts=E, num_hidden_layers=1, swiglu_limit=0.7,
                             routed_scaling_factor=1.5, mlp_layer_types=["hash_moe" if hashed else "moe"], **common)
    fields = dict(score="sqrtsoftplus", score_bias=not hashed, num_shared=1, renormalize=True, routed_scale=1.5,
                  swiglu_limit=0.7)
    return m.DeepseekV4SparseMoeBlock(cfg, 0), "hash_moe" if hashed else "moe", fields
  if model.startswith("qwen3_moe"):
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m
    norm = model.endswith("norm")
    cfg = m.Qwen3MoeConfig(moe_intermediate_size=F, num_experts=E, norm_topk_prob=norm, **common)
    return m.Qwen3MoeSparseMoeBlock(cfg), "moe", dict(score="softmax", renormalize=norm)
  from transformers.models.mixtral import modeling_mixtral as m
  cfg = m.MixtralConfig(intermediate_size=F, num_local_experts=E, **common)
  return m.MixtralSparseMoeBlock(cfg), "moe", dict(score="softmax", renormalize=True)


def _to_moejax(block, variables):
  """Copies the transformers block's weights into moejax's layout (variables updated in place)."""
  sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
  router = next(k.rsplit(".", 1)[0] for k in sd if k.endswith("weight") and sd[k].shape == (E, D))
  p = variables["params"]
  p["router"]["w_gate"] = sd[f"{router}.weight"].T
  gate_up, down = sd["experts.gate_up_proj"], sd["experts.down_proj"]  # [E, 2F, D], [E, D, F]
  p["w_gate"], p["w_up"] = gate_up[:, :F].transpose(0, 2, 1), gate_up[:, F:].transpose(0, 2, 1)
  p["w_down"] = down.transpose(0, 2, 1)
  if "shared" in p:
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
      p["shared"][ours] = sd[f"shared_experts.{theirs}.weight"].T
  if f"{router}.e_score_correction_bias" in sd:
    variables["router_bias"] = {"router": {"bias": sd[f"{router}.e_score_correction_bias"]}}
  if f"{router}.tid2eid" in sd:
    variables["hash_table"] = {"router": {"tid2eid": sd[f"{router}.tid2eid"].astype(np.int32)}}


@pytest.mark.parametrize("model", ["deepseek_v3", "deepseek_v4", "deepseek_v4_hash", "qwen3_moe", "qwen3_moe_norm",
                                   "mixtral"])
def test_moe_block_matches_transformers(model):
  torch.manual_seed(0)
  block, mlp_type, fields = _block(model)
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

  layer, variables = init_moe(moe_cfg(**fields), x, ids, mlp_type)
  _to_moejax(block, variables)
  got = jax.jit(layer.apply)(variables, x, ids)
  chex.assert_trees_all_close(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
