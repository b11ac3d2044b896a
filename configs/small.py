"""~100M-parameter dense LM for one GPU/TPU host (research scale).

  moejax train --config configs/small.py --workdir workdirs/small

12 layers, d_model 768, 12 heads (4 kv heads), SwiGLU 2048, a 32k vocabulary
(bring a tokenizer: --config.data.tokenizer=path/to/tokenizer.model; with the
default byte tokenizer the unused rows simply stay untrained), bf16 compute,
FSDP over all devices. No variants (``configs/small.py:ARG`` is an error; the
grammar: moejax/config_variants.py); override fields with ``--config.FIELD=...``.
"""

from moejax.config import base_config
from moejax.config_variants import parse_arg


def get_config(arg: str | None = None):
  parse_arg(arg)
  c = base_config()
  c.model.update(num_layers=12, d_model=768, num_heads=12, num_kv_heads=4, ffn_dim=2048,
                 vocab_size=32_768, dtype="bfloat16", param_dtype="float32", remat=("dots_no_batch",))
  c.data.seq_len = 2048
  c.train.update(steps=20_000, batch_size=64, log_every=50, eval_every=1000, eval_batches=16,
                 checkpoint_every=1000)
  c.optim.update(learning_rate=1e-3, warmup_steps=1000, weight_decay=0.1)
  c.mesh.update(data=1, fsdp=-1)
  return c
