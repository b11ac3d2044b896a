"""Tiny hybrid-attention LMs: attention types mixed per layer (2 CPU cores, minutes).

  moejax train --config configs/tiny_hybrid.py                    # 5 sliding : 1 dense, stdlib bytes
  moejax train --config configs/tiny_hybrid.py:v4,passkey         # DeepSeek-V4 schedule, passkey task
  moejax train --config configs/tiny_hybrid.py:dsa,warmup,passkey # DSA, indexer warm-up stage

The variant (the grammar: moejax/config_variants.py) is a comma-separated
list of values: at most one ``schedule`` (``sliding`` (default), ``v4``: 2 x HCA
then alternating CSA/HCA, ``mla``, ``dsa``, ``mixed``: one layer of each sparse
type), at most one indexer ``stage`` (``sparse`` (default), ``warmup``, ``off``)
and at most one ``data`` source (``stdlib`` (default), ``passkey``, ``copy``,
``mqar``); ``schedule=v4,data=passkey`` is the same as ``v4,passkey``.
Schedules with V4 layers (``v4``, ``mixed``) train with Muon. Any field can
still be overridden, e.g. ``--config.model.attention.window=32``. See
docs/attention.md.
"""

from moejax.config import INDEXER_STAGES, base_config
from moejax.config_variants import one_of, parse_arg
from moejax.layers.attention.compressed import V4_TYPES

SCHEDULES = {
    "sliding": ("sliding",) * 5 + ("dense",),
    "v4": ("hca", "hca", "csa", "hca", "csa", "hca"),
    "mla": ("mla",) * 6,
    "dsa": ("dsa",) * 6,
    "mixed": ("swa", "csa", "hca", "dsa", "mla", "sliding"),
}
DATA = ("stdlib", "passkey", "copy", "mqar")


def get_config(arg: str | None = None):
  a = parse_arg(arg, schedule=one_of(*SCHEDULES), stage=one_of(*INDEXER_STAGES, default="sparse"),
                data=one_of(*DATA))
  schedule = a.schedule
  c = base_config()
  c.model.update(num_layers=6, d_model=128, num_heads=4, num_kv_heads=2, ffn_dim=384,
                 attention_types=SCHEDULES[schedule])
  c.model.attention.update(
      window=64, chunk_size=256, sinks=True,
      # MLA / DSA: 16 + 16 query/key channels per head, 64-wide latent
      q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32,
      index_heads=4, index_head_dim=32, index_topk=64,
      # DeepSeek-V4: partial interleaved rope on 16 of 32 channels, its own compressed-layer rope
      rope_dim=16 if schedule in ("v4", "mixed") else 0,
      rope_layout="interleave" if schedule in ("v4", "mla", "dsa", "mixed") else "half",
      csa_ratio=4, hca_ratio=32, o_groups=2, o_lora_rank=64, compress_rope_theta=160_000.0)
  c.model.attention.indexer_stage = a.stage
  c.data.seq_len = 512
  c.train.update(steps=300, batch_size=8, log_every=10, eval_every=100, checkpoint_every=100)
  c.optim.update(learning_rate=3e-3, warmup_steps=30)
  if set(SCHEDULES[schedule]) & set(V4_TYPES):
    # V4 layers (unscaled q-norm, one normalised K=V vector) stall under AdamW at this
    # rate at these widths; Muon trains their windows (docs/attention.md, experiments/long_context).
    c.optim.name = "muon"
  c.data.source = a.data
  if a.data != "stdlib":
    c.data.task_length = c.data.seq_len
  return c
