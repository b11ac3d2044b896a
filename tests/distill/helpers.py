"""A tiny distillation setting with untrained teachers (no specialist training in unit tests)."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.config import base_config
from moejax.distill.config import domain, teacher_config
from moejax.distill.run import DistillExperiment, Teacher
from moejax.models import build_model


def tiny_distill_cfg(**distill_fields):
  c = base_config()
  c.model.update(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, ffn_dim=64, mlp_types=("dense", "moe"))
  c.model.moe.update(num_experts=4, top_k=2, expert_ffn_dim=16, collapse_steps=0)
  c.data.seq_len = 32
  c.train.update(steps=4, batch_size=6, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=2, loss_chunk=8)
  c.optim.update(learning_rate=3e-3, warmup_steps=1)
  c.distill.update(teacher_steps=2, **distill_fields)
  c.distill.domains.email = domain("stdlib", stdlib_packages="email")
  c.distill.domains.copy = domain("copy", task_length=16, weight=2.0)
  return c


def random_teachers(cfg, widths=(48, 32)):
  """Untrained dense teachers of the given widths, one per domain (in config order), own seeds."""
  teachers = []
  for i, (name, width) in enumerate(zip(cfg.distill.domains, widths)):
    tcfg = teacher_config(cfg, name)
    tcfg.model.update(d_model=width, ffn_dim=2 * width)
    model = build_model(tcfg.model)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(10 + i), jnp.zeros((1, 4), jnp.int32)))
    params = variables.pop("params")
    teachers.append(Teacher(name, f"/nonexistent/{name}", tcfg, model, params, variables))
  return teachers


def distill_experiment(cfg, devices, cache_dir=""):
  return DistillExperiment(copy.deepcopy(cfg), random_teachers(cfg), devices, cache_dir)
