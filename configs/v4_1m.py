"""A tiny DeepSeek-V4-shaped model trained on one 1,048,576-token sequence (CPU or one GPU).

  moejax train --config configs/v4_1m.py --config.train.steps=2 --workdir /tmp/v4_1m
  moejax train --config configs/v4_1m.py:t=262144             # any other length (a power of two)

The variant ``t=<tokens>`` sets the sequence length (default 1048576; the
grammar: moejax/config_variants.py).
  python benchmarks/long_context.py                           # peak memory, time, largest T per schedule

Hybrid attention (DeepSeek-V4 report §2.3) — a sliding-window layer, CSA
(indexer top-k over overlapping compressed entries) and HCA (all heavily
compressed entries), each with the 128-token window — and MoE MLPs with a
hash-routed first layer (``hash_moe``) and a shared expert. Compression
ratios are larger than V4's (4 / 128) so the O(T^2 / ratio) compressed parts
stay minutes on 2 CPU cores at T = 1M; ``index_topk`` entries of 256 tokens
still cover 16k tokens per query. Memory: every block is rematerialised
(``model.remat=full``: only the block inputs stay, 4 x [T, D]), the loss forms
logits ``loss_chunk`` positions at a time, and every attention part is O(T)
in memory (see docs/long_context.md). Data: the standard library's source
files as bytes, packed into one 1M-token row (document-masked attention).
"""

from moejax.config import base_config
from moejax.config_variants import parse_arg


def get_config(arg: str | None = None):
  seq_len = parse_arg(arg, t=1 << 20).t
  c = base_config()
  c.model.update(num_layers=4, d_model=64, num_heads=2, num_kv_heads=1, head_dim=32, ffn_dim=128,
                 attention_types=("swa", "csa", "hca", "csa"), mlp_types=("hash_moe", "moe", "moe", "moe"),
                 remat=("full",))
  c.model.attention.update(
      window=128, chunk_size=128, sinks=True, q_lora_rank=32, rope_dim=16, rope_layout="interleave",
      csa_ratio=256, hca_ratio=2048, index_heads=1, index_head_dim=16, index_topk=64,
      o_groups=1, o_lora_rank=32, compress_rope_theta=160_000.0, indexer_recall_queries=64)
  c.model.moe.update(num_experts=8, top_k=2, expert_ffn_dim=64, num_shared=1, dispatch="capacity",
                     capacity_factor=1.25)
  c.data.update(source="stdlib", seq_len=seq_len)
  c.train.update(steps=2, batch_size=1, loss_chunk=8192, log_every=1, eval_every=0, checkpoint_every=1000)
  c.optim.update(learning_rate=1e-3, warmup_steps=0)
  c.mesh.update(data=1)
  return c
