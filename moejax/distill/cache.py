"""The teacher cache (``distill.teacher_source="cache"``): teachers run once, ahead of the student.

For teachers too big to sit next to the student. :func:`write_cache` runs
the student's training batches (``moejax/distill/data.py``, same seed and
order) through each row's teacher and stores, per batch, the batch itself
plus ``teacher_x_BxTxD``: the row's teacher final normed hidden state,
zero-padded to the widest teacher. Hidden states, not logits: ``D`` floats
per token instead of ``V`` (the KL forms teacher logits chunk by chunk from
them and the teacher's output matrix, which the step keeps). Batches are
written ``CHUNK`` at a time as Orbax checkpoints ``chunk_00000, ...`` and a
``cache.json`` (written last: a cache without it is incomplete and rebuilt).

:class:`CachedBatches` reads them back in the same order (cycling after
``distill.cache_batches``) and saves its position with the student's
checkpoints, so a resumed student sees the same batches.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from moejax.distill.data import DomainBatches, domain_slices
from moejax.distill.objective import teacher_hidden

CHUNK = 16            # batches per Orbax checkpoint
META = "cache.json"


def _expected(cfg: ml_collections.ConfigDict, teachers) -> dict:
  return {"num_batches": cfg.distill.cache_batches or cfg.train.steps, "chunk": CHUNK, "seed": cfg.seed,
          "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
          "teachers": [t.workdir for t in teachers]}


def write_cache(cfg: ml_collections.ConfigDict, teachers, cache_dir: str, devices=None) -> None:
  """Writes the cache unless a complete one for the same settings exists."""
  meta = _expected(cfg, teachers)
  meta_path = os.path.join(cache_dir, META)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      if json.load(f) == meta:
        return
  shutil.rmtree(cache_dir, ignore_errors=True)
  os.makedirs(cache_dir)
  accum, width = cfg.train.grad_accum_steps, max(t.cfg.model.d_model for t in teachers)
  forward = [jax.jit(lambda p, ms, rows, m=t.model: teacher_hidden(m, p, ms, rows)[0])
             for t in teachers]
  data = DomainBatches(cfg, split="train", seed=cfg.seed)
  ckptr = ocp.StandardCheckpointer()
  chunk: list[dict] = []
  for i in range(meta["num_batches"]):
    batch = next(data)
    parts = []
    for s, t, f in zip(domain_slices(cfg), teachers, forward):
      rows = {k: jnp.asarray(batch[k][s.start * accum:s.stop * accum]) for k in ("inputs", "positions", "segment_ids")}
      x = np.asarray(jax.device_get(f(t.params, t.model_state, rows)), np.float32)
      parts.append(np.pad(x, [(0, 0), (0, 0), (0, width - x.shape[-1])]))
    chunk.append(dict(batch, teacher_x_BxTxD=np.concatenate(parts)))
    if len(chunk) == CHUNK or i == meta["num_batches"] - 1:
      stacked = {k: np.stack([b[k] for b in chunk]) for k in chunk[0]}
      ckptr.save(os.path.join(os.path.abspath(cache_dir), f"chunk_{i // CHUNK:05d}"), stacked)
      ckptr.wait_until_finished()
      chunk = []
  with open(meta_path, "w") as f:
    json.dump(meta, f)


class CachedBatches:
  """Batches (with ``teacher_x_BxTxD``) from a cache, in the order written, cycling."""

  def __init__(self, cache_dir: str):
    with open(os.path.join(cache_dir, META)) as f:
      self.meta = json.load(f)
    self.cache_dir = os.path.abspath(cache_dir)
    self.index = 0
    self._loaded: tuple[int, dict] | None = None
    self._ckptr = ocp.StandardCheckpointer()

  def __iter__(self) -> "CachedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    i = self.index % self.meta["num_batches"]
    chunk = i // self.meta["chunk"]
    if self._loaded is None or self._loaded[0] != chunk:
      restored = self._ckptr.restore(os.path.join(self.cache_dir, f"chunk_{chunk:05d}"))
      self._loaded = (chunk, {k: np.asarray(v) for k, v in restored.items()})
    self.index += 1
    return {k: v[i % self.meta["chunk"]] for k, v in self._loaded[1].items()}

  def shard_states(self) -> dict[str, dict]:
    return {"teacher_cache": {"index": self.index}}

  def set_shard_states(self, states: dict[str, dict]) -> None:
    self.index = int(states["teacher_cache"]["index"])
