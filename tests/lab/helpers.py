"""Tiny configs shared by the lab tests."""

from moejax.config import base_config


def tiny_lab_cfg(steps: int = 6, **moe):
  """2 layers (dense, moe), d_model 32, 4 experts top-2, seq 32, batch 4, stdlib bytes."""
  c = base_config()
  c.model.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=64, mlp_types=("dense", "moe"))
  c.model.moe.update(num_experts=4, top_k=2, expert_ffn_dim=16, collapse_steps=0)
  c.model.moe.update(moe)
  c.data.seq_len = 32
  c.train.update(steps=steps, batch_size=4, log_every=1, eval_every=steps, eval_batches=1, checkpoint_every=steps)
  c.optim.update(learning_rate=3e-3, warmup_steps=1)
  return c
