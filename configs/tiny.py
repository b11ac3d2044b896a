"""Tiny dense byte-level LM: the default 400 steps take about 8 minutes on 2 CPU cores (measured under load).

  moejax train --config configs/tiny.py --workdir workdirs/tiny

Variant (the grammar: moejax/config_variants.py): the embedded data source,
``configs/tiny.py:copy`` (or ``passkey``, ``mqar``; ``data=copy`` is the same)
trains on a synthetic long-context task instead of the Python standard
library's source code (``stdlib``, the default).
"""

from moejax.config import base_config
from moejax.config_variants import one_of, parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, data=one_of("stdlib", "copy", "passkey", "mqar"))
  c = base_config()
  c.model.update(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, ffn_dim=384)
  c.data.seq_len = 256
  c.train.update(steps=400, batch_size=16, log_every=10, eval_every=100, checkpoint_every=100)
  c.optim.update(learning_rate=3e-3, warmup_steps=40)
  if a.data != "stdlib":
    c.data.source = a.data
    c.data.task_length = c.data.seq_len // 2
  return c
