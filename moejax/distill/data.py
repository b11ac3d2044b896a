"""Student batches laid out by domain, each row tagged with its domain.

A global batch of B rows with ``grad_accum_steps = n`` micro-batches of
``m = B / n`` rows: domain k gets ``r_k`` rows of every micro-batch
(:func:`moejax.distill.config.rows_per_domain`, proportional to its weight), as
one contiguous block of ``r_k * n`` global rows. The trainer's micro-batch j
takes global rows ``j, j + n, ...`` so *every* micro-batch holds domain k in
rows ``[s_k, s_k + r_k)``: the teachers run on static row slices, each only
on its own rows (no teacher computes rows it does not score).

Each domain reads its own grain pipeline (``moejax.data.ShardedBatches`` over
that domain's data config), so the mixture is stratified: exactly ``r_k / m``
of every batch is domain k, with no sampling noise. The iterator saves and
restores every domain's position with the trainer's checkpoints.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections
import numpy as np

from moejax.data import ShardedBatches
from moejax.distill.config import domain_data, rows_per_domain


class DomainSlice(NamedTuple):
  """Rows ``[start, stop)`` of every micro-batch belong to domain ``index`` (named ``name``)."""

  name: str
  index: int
  start: int
  stop: int


def domain_slices(cfg: ml_collections.ConfigDict) -> tuple[DomainSlice, ...]:
  """The micro-batch row layout, in ``distill.domains`` order."""
  slices, start = [], 0
  for index, (name, rows) in enumerate(rows_per_domain(cfg).items()):
    slices.append(DomainSlice(name, index, start, start + rows))
    start += rows
  return tuple(slices)


class DomainBatches:
  """Endless global batches of every domain, laid out as in the module docstring.

  Yields the usual ``[B, T]`` arrays (``inputs``, ``targets``, ``weights``,
  ``segment_ids``, ``positions``) plus ``domain_BxT`` (int32, the row's domain
  index, constant along T). Single-process (one process owns every row).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, split: str, seed: int):
    accum = cfg.train.grad_accum_steps
    self.slices = domain_slices(cfg)
    self._iterators = {
        s.name: ShardedBatches(domain_data(cfg, s.name), split=split, global_batch=(s.stop - s.start) * accum,
                               seed=seed + s.index, num_shards=1)
        for s in self.slices}

  def __iter__(self) -> "DomainBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = []
    for s in self.slices:
      part = next(self._iterators[s.name])
      part["domain_BxT"] = np.full(part["inputs"].shape, s.index, np.int32)
      parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def shard_states(self) -> dict[str, dict]:
    return {f"{name}.{key}": state for name, it in self._iterators.items()
            for key, state in it.shard_states().items()}

  def set_shard_states(self, states: dict[str, dict]) -> None:
    for name, it in self._iterators.items():
      prefix = name + "."
      it.set_shard_states({k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)})
