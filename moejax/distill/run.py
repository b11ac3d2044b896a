"""``moejax distill``: train the specialists, distill them into the student, report.

``run_distill(cfg, workdir)``:

1. each domain's specialist trains with ``moejax.train.train`` in
   ``workdir/teachers/<domain>`` (resumable; a finished one is not retrained),
   or a domain's ``teacher_workdir`` is used as it is;
2. the student trains with the same ``train`` loop (checkpoints, resume,
   preemption, metrics) through :class:`DistillExperiment`, whose step adds
   the distillation term (``moejax/distill/objective.py``) and whose data is
   the union of the domains (``moejax/distill/data.py``);
3. ``workdir/distill_report.md``: per-domain student CE, KL to its teacher,
   teacher CE, and the domain -> expert heatmaps (``moejax/distill/report.py``).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import config as config_lib
from moejax.validation import validate
from moejax.checkpoint import Checkpointer
from moejax.distill import cache as cache_lib
from moejax.distill.config import teacher_config
from moejax.distill.data import DomainBatches, domain_slices
from moejax.distill.objective import DistillObjective
from moejax.losses import chunked_token_stats
from moejax.sharding import put_batch
from moejax.train import Experiment, forward, load_checkpoint, train

log = logging.getLogger(__name__)


class Teacher(NamedTuple):
  name: str
  workdir: str
  cfg: ml_collections.ConfigDict
  model: nn.Module
  params: dict
  model_state: dict


def teacher_workdir(cfg: ml_collections.ConfigDict, workdir: str, name: str) -> str:
  return cfg.distill.domains[name].teacher_workdir or os.path.join(workdir, "teachers", name)


def train_teachers(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> None:
  """Trains every specialist that is not finished (resuming unfinished ones)."""
  for name, d in cfg.distill.domains.items():
    if d.teacher_workdir:
      continue
    tcfg, twd = teacher_config(cfg, name), teacher_workdir(cfg, workdir, name)
    ckpt = Checkpointer(twd, keep=tcfg.train.keep_checkpoints)
    done = ckpt.latest_step() == tcfg.train.steps
    ckpt.close()
    if done:
      log.info("teacher %s: finished in %s, reused", name, twd)
      continue
    log.info("teacher %s: training %d steps in %s", name, tcfg.train.steps, twd)
    train(tcfg, twd, devices)


def load_teachers(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> list[Teacher]:
  """Every domain's trained specialist, on the student's mesh shape and devices."""
  teachers = []
  for name in cfg.distill.domains:
    tcfg = teacher_config(cfg, name)
    tcfg.mesh = cfg.mesh
    _check_vocab(cfg, tcfg, name)
    twd = teacher_workdir(cfg, workdir, name)
    exp, _, state = load_checkpoint(tcfg, twd, devices)
    teachers.append(Teacher(name, twd, tcfg, exp.model, state.params, state.model_state))
  return teachers


def _check_vocab(cfg, tcfg, name: str) -> None:
  if tcfg.model.vocab_size != cfg.model.vocab_size or tcfg.data.tokenizer != cfg.data.tokenizer:
    raise config_lib.ConfigError(
        f"distill.domains.{name}: the teacher's vocabulary (model.vocab_size={tcfg.model.vocab_size}, "
        f"data.tokenizer={tcfg.data.tokenizer!r}) differs from the student's ({cfg.model.vocab_size}, "
        f"{cfg.data.tokenizer!r}); a full-vocabulary KL needs the same token ids: give the student the "
        "teacher's tokenizer and vocab_size.")


class DistillExperiment(Experiment):
  """The student's :class:`Experiment` with the distillation objective and domain data.

  ``train_step(state, batch)`` is the trainer's pure step with
  ``extra = teachers`` (frozen, passed as arguments, sharded like they were
  trained); :meth:`evaluate` reports per-domain CE and KL on the validation
  split of every domain.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, teachers: list[Teacher], devices=None, cache_dir: str = ""):
    self.slices = domain_slices(cfg)
    self.teachers, self.cache_dir = teachers, cache_dir
    cached = cfg.distill.teacher_source == "cache"
    models = [t.model for t in teachers]
    objective = (DistillObjective(cfg, self.slices, [t.cfg.model.d_model for t in teachers], cached=True)
                 if cached else DistillObjective(cfg, self.slices, models, cached=False))
    super().__init__(cfg, devices, extra_objective=objective)
    # Evaluation runs the teachers in the step whatever the source (the cache holds training batches only).
    self.objective = DistillObjective(cfg, self.slices, models, cached=False)
    self.cohost_extra = tuple((t.params, t.model_state) for t in teachers)
    self.extra = (tuple(jax.jit(lambda p, ms, m=t.model: _head(m, p, ms))(t.params, t.model_state) for t in teachers)
                  if cached else self.cohost_extra)
    self._eval_sums = jax.jit(self._eval_fn)
    self._sample = jax.jit(self._sample_fn)

  def _sample_fn(self, params, model_state, prompts_BxP, rng):
    from moejax.generate import sample

    dc = self.cfg.distill
    lengths_B = jnp.full(prompts_BxP.shape[:1], prompts_BxP.shape[1], jnp.int32)
    out = sample(self.model, {"params": params, **model_state}, prompts_BxP, lengths_B, rng=rng,
                 max_new_tokens=dc.continuation_len, temperature=dc.sample_temperature, prefill_chunk=dc.prompt_len)
    return out.tokens_BxN

  def on_policy_batch(self, state, batch):
    """The student's own continuations of each row's first ``prompt_len`` tokens, as a batch.

    Rows keep their domain (so each is scored by its own teacher); ``weights``
    are 1 on the positions that predict sampled tokens and 0 on the prompt.
    The sampling key is ``fold_in(key(seed), step)``: a resumed run draws the
    same samples. Shapes: ``[B, prompt_len + continuation_len - 1]``.
    """
    dc = self.cfg.distill
    prompts_BxP = batch["inputs"][:, :dc.prompt_len]
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed), state.step)
    with self._context():
      continuation_BxN = np.asarray(jax.device_get(self._sample(state.params, state.model_state, prompts_BxP, rng)))
    seq = np.concatenate([prompts_BxP, continuation_BxN], axis=1)
    b, t = seq.shape[0], seq.shape[1] - 1
    weights = np.zeros((b, t), np.float32)
    weights[:, dc.prompt_len - 1:] = 1.0
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": weights,
            "segment_ids": np.ones((b, t), np.int32), "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
            "domain_BxT": batch["domain_BxT"][:, :t]}

  def train_step(self, state, batch):
    if self.cfg.distill.mode == "on_policy":
      batch = self.on_policy_batch(state, batch)
    return super().train_step(state, batch)

  def _eval_fn(self, params, model_state, batch, extra):
    out = forward(self.model, params, model_state, batch, self.cfg.train.loss_chunk, capture_experts=True)
    total = jnp.sum(batch["weights"].astype(jnp.float32))
    _, sums = self.objective.term(extra, batch, out, total)
    teacher_ce = []
    for s in self.slices:
      rows = {k: v[s.start:s.stop] for k, v in batch.items()}
      xt, head_t = self.objective.teacher(extra, s.index, rows)
      ce, _ = chunked_token_stats(xt, head_t, rows["targets"], self.cfg.train.loss_chunk)
      teacher_ce.append(jnp.sum(ce * rows["weights"].astype(jnp.float32)))
    return {**sums, "total_weight": total, "teacher_ce_sum_K": jnp.stack(teacher_ce)}

  def data_iterator(self, split: str):
    try:
      if split == "train" and self.cfg.distill.teacher_source == "cache":
        return cache_lib.CachedBatches(self.cache_dir)
      return DomainBatches(self.cfg, split=split, seed=self.cfg.seed)
    except (ValueError, OSError, UnicodeError) as err:
      raise config_lib.ConfigError(f"distill data ({split} split): {err}") from err

  def evaluation_sums(self, state, num_batches: int) -> dict[str, np.ndarray]:
    """Sums over the first validation batches (CE, KL, teacher CE per domain; routing counts)."""
    it = DomainBatches(self.cfg, split="validation", seed=self.cfg.seed)
    totals = None
    with self._context():
      for _ in range(num_batches):
        sums = jax.device_get(self._eval_sums(state.params, state.model_state, put_batch(next(it), self.mesh),
                                              self.cohost_extra))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return totals

  def evaluate(self, state, num_batches: int) -> dict[str, float]:
    """``eval_loss`` (student CE), ``eval_kl`` and per domain ``ce_<d>``, ``kl_<d>``, ``teacher_ce_<d>``."""
    sums = self.evaluation_sums(state, num_batches)
    total = max(float(sums["total_weight"]), 1.0)
    metrics = self.objective.metrics(sums, total, prefix="")
    weight_K = np.maximum(sums["weight_K"], 1.0)
    out = {"eval_loss": float(np.sum(sums["ce_sum_K"])) / total, "eval_kl": float(metrics["kl"]),
           **{f"{p}_{s.name}": float(metrics[f"{p}_{s.name}"]) for s in self.slices for p in ("ce", "kl")},
           **{f"teacher_ce_{s.name}": float(sums["teacher_ce_sum_K"][s.index] / weight_K[s.index])
              for s in self.slices}}
    return out


def _head(model, params, model_state):
  """A model's output matrix [D, V] (from a one-token forward)."""
  one = jnp.zeros((1, 1), jnp.int32)
  return model.apply({"params": params, **model_state}, one, return_hidden=True).head_DxV


def run_distill(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
  """The whole recipe (module docstring); returns the report's per-domain table."""
  from moejax.distill import report

  validate(cfg, num_devices=len(devices or jax.devices()))
  if not cfg.distill.domains:
    raise config_lib.ConfigError("distill.domains is empty; add domains, e.g. "
                                 "c.distill.domains.email = domain(source='stdlib', stdlib_packages='email') "
                                 "(see configs/distill_tiny.py).")
  train_teachers(cfg, workdir, devices)
  teachers = load_teachers(cfg, workdir, devices)
  cache_dir = ""
  if cfg.distill.teacher_source == "cache":
    cache_dir = cfg.distill.cache_dir or os.path.join(workdir, "teacher_cache")
    cache_lib.write_cache(cfg, teachers, cache_dir, devices)
  exp = DistillExperiment(cfg, teachers, devices, cache_dir)
  state = train(cfg, workdir, devices, experiment=exp)
  return report.write_report(exp, state, workdir)
