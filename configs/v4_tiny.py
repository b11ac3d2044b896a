"""A tiny DeepSeek-V4-shaped LM: every V4 ingredient at CPU size (2 cores, minutes).

  moejax train --config configs/v4_tiny.py --workdir workdirs/v4_tiny          # passkey retrieval
  moejax train --config configs/v4_tiny.py:stdlib --workdir workdirs/v4_stdlib # bytes of the stdlib

4 layers, d_model 128, as DeepSeek-V4 lays them out:
- attention: 2 x HCA (heavily compressed, m = hca_ratio) then CSA (compressed
  m = csa_ratio + lightning-indexer top-k) / HCA alternating; every layer also
  attends a sliding window with per-head sinks; low-rank queries, grouped
  low-rank output, partial interleaved RoPE with its own theta on compressed
  layers;
- MLP: hash-routed MoE in the first layers (the expert is a fixed function of
  the token id), learned sqrtsoftplus routing with the aux-loss-free bias in
  the rest; 16 experts top-4 + 1 shared, SwiGLU clamp 10;
- residual: mHC with 4 streams (Sinkhorn-normalised mixing);
- one MTP module (an SWA block) predicting the token after next;
- optimizer: Muon (AdamW for embeddings, head, norms, routers).

The variant picks the data (``data=copy`` is the same as ``copy``; the grammar:
moejax/config_variants.py): ``passkey`` (default: find a 5-digit key in
filler text), ``mqar``, ``copy`` or ``stdlib``. Shapes are overridable as
usual, e.g. ``--config.model.hc.streams=1`` for the plain residual.
"""

from moejax.config import base_config
from moejax.config_variants import one_of, parse_arg
from moejax.layers.routers import ROUTER_RECIPES

DATA = ("passkey", "mqar", "copy", "stdlib")


def get_config(arg: str | None = None):
  source = parse_arg(arg, data=one_of(*DATA)).data
  c = base_config()
  c.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=1, ffn_dim=384,
                 attention_types=("hca", "hca", "csa", "hca"),
                 mlp_types=("hash_moe", "hash_moe", "moe", "moe"))
  c.model.attention.update(
      window=32, sinks=True, chunk_size=256,
      q_lora_rank=64, rope_dim=16, rope_layout="interleave", compress_rope_theta=160_000.0,
      csa_ratio=4, hca_ratio=16, o_groups=2, o_lora_rank=64,
      index_heads=4, index_head_dim=32, index_topk=8)
  c.model.moe.update(num_experts=16, top_k=4, expert_ffn_dim=64, num_shared=1, bias_update_rate=0.01,
                     **ROUTER_RECIPES["v4"])
  c.model.hc.streams = 4
  c.model.mtp.update(depth=1, loss_weight=0.3, attention_type="swa", mlp_type="dense")
  c.optim.update(name="muon", learning_rate=3e-3, warmup_steps=40)
  c.data.update(source=source, seq_len=128)
  if source != "stdlib":
    c.data.task_length = c.data.seq_len
  c.train.update(steps=300, batch_size=8, log_every=10, eval_every=100, checkpoint_every=100)
  return c
