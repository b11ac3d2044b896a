"""Tiny fine-grained MoE byte-level LM: the default run takes about 20 minutes on 2 CPU cores (measured under load).

  moejax train --config configs/tiny_moe.py --workdir workdirs/tiny_moe

4 layers, d_model 128; layer 0 dense, layers 1-3 MoE with 16 routed experts
(top-4, width 64) plus one shared expert (width 64): per token the MoE layers
run 5 x 64 = 320 hidden units, the dense FFN of configs/tiny.py 384.
DeepSeek-V3 routing: sigmoid scores, the auxiliary-loss-free balancing bias,
group-limited selection (4 groups, top 2), renormalised weights.

The variant picks another router recipe (same shapes; ``recipe=v4`` is the same
as ``v4``; the grammar: moejax/config_variants.py):

  configs/tiny_moe.py:v3            the default above
  configs/tiny_moe.py:v4            DeepSeek-V4: hash routing in layer 1, sqrtsoftplus, swiglu clamp 10
  configs/tiny_moe.py:qwen3         softmax top-k, Switch load-balance loss (Qwen3-MoE)
  configs/tiny_moe.py:mixtral       softmax over the top-k logits (== renormalised), no shared expert
  configs/tiny_moe.py:expert_choice every expert takes its top-C tokens (research only: not causal)
  configs/tiny_moe.py:no_bias       v3 without the balancing bias (experiments/moe_balance)
"""

from moejax.config import base_config
from moejax.config_variants import one_of, parse_arg
from moejax.layers.routers import ROUTER_RECIPES


def get_config(arg: str | None = None):
  recipe = parse_arg(arg, recipe=one_of(*ROUTER_RECIPES, default="v3")).recipe
  c = base_config()
  c.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, ffn_dim=384,
                 mlp_types=("dense", "hash_moe" if recipe == "v4" else "moe", "moe", "moe"))
  c.model.moe.update(num_experts=16, top_k=4, expert_ffn_dim=64, num_shared=1, bias_update_rate=0.01)
  c.model.moe.update(ROUTER_RECIPES[recipe])
  c.data.seq_len = 256
  c.train.update(steps=400, batch_size=16, log_every=10, eval_every=100, checkpoint_every=100)
  c.optim.update(learning_rate=3e-3, warmup_steps=40)
  return c
