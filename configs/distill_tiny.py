"""Four tiny dense specialists distilled into one tiny MoE student (docs/distill.md).

  moejax distill --config configs/distill_tiny.py --workdir workdirs/distill_tiny

Domains: three groups of standard-library packages (``email``, ``http,json``,
``asyncio``) and the synthetic ``copy`` task, byte-level. Each specialist is
the student's shape with dense MLPs, trained ``distill.teacher_steps`` on its
domain; the student (layer 0 dense, layer 1 MoE: 8 experts, top-2, no shared
expert, so the router alone decides what each domain gets) trains on the
union with ``0.5 * CE + 0.5 * KL(p_teacher || p_student)`` over the full
vocabulary. The whole recipe runs in minutes on 2 CPU cores.

Variants, ``configs/distill_tiny.py:FLAG,FLAG`` (the grammar: moejax/config_variants.py):
flags ``reverse`` (reverse KL), ``cache`` (teachers precomputed into an Orbax
cache), ``on_policy`` (the student's own samples, reverse KL), ``labels``
(alpha=1: the labels-only control), e.g. ``configs/distill_tiny.py:cache,reverse``.
"""

from moejax.config import base_config
from moejax.config_variants import parse_arg
from moejax.distill.config import domain

VARIANTS = {
    "reverse": dict(kl="reverse"),
    "cache": dict(teacher_source="cache"),
    "on_policy": dict(mode="on_policy", kl="reverse"),
    "labels": dict(alpha=1.0),
}


def get_config(arg: str | None = None):
  c = base_config()
  c.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=192, mlp_types=("dense", "moe"))
  c.model.moe.update(num_experts=8, top_k=2, expert_ffn_dim=48, score="softmax", renormalize=True,
                     load_balance_weight=0.01, collapse_steps=0)
  c.data.seq_len = 128
  c.train.update(steps=200, batch_size=8, log_every=10, eval_every=100, eval_batches=2, checkpoint_every=100)
  c.optim.update(learning_rate=3e-3, warmup_steps=20)
  c.distill.update(alpha=0.5, temperature=1.0, teacher_steps=150)
  c.distill.domains.email = domain("stdlib", stdlib_packages="email")
  c.distill.domains.http = domain("stdlib", stdlib_packages="http,json")
  c.distill.domains.asyncio = domain("stdlib", stdlib_packages="asyncio")
  c.distill.domains.copy = domain("copy", task_length=64)
  flags = parse_arg(arg, **{name: False for name in VARIANTS})
  for name, fields in VARIANTS.items():
    if flags[name]:
      c.distill.update(fields)
  return c
