"""Domain batches (layout, resume) and the teacher cache (== co-hosted teachers)."""

import copy

import chex
import jax
import numpy as np
import pytest

from moejax.distill import cache as cache_lib
from moejax.distill.data import DomainBatches
from moejax.distill.run import DistillExperiment
from moejax.grad_accum import split_micro
from tests.distill.helpers import random_teachers, tiny_distill_cfg

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


def test_every_micro_batch_holds_each_domain_in_its_rows():
  cfg = tiny_distill_cfg()
  cfg.train.grad_accum_steps = 3  # micro-batches of 2 rows: copy row 0, email row 1
  data = DomainBatches(cfg, split="train", seed=0)
  batch = next(data)
  chex.assert_shape(batch["domain_BxT"], (6, 32))
  micros = jax.device_get(split_micro(batch, 3))
  for j in range(3):
    np.testing.assert_array_equal(micros["domain_BxT"][j][:, 0], [s.index for s in data.slices])
  copy_rows = batch["inputs"][batch["domain_BxT"][:, 0] == 0]
  assert np.all(copy_rows < 256)  # byte tokens of the copy task's rows
  state = data.shard_states()
  expected = next(data)
  resumed = DomainBatches(cfg, split="train", seed=0)
  resumed.set_shard_states(state)
  chex.assert_trees_all_equal(next(resumed), expected)


def test_cached_teachers_give_the_cohosted_step(devices, tmp_path):
  """Two steps from the Orbax cache (read back across a chunk boundary, then after a resume)
  equal two steps with the teachers in the step."""
  cfg = tiny_distill_cfg()
  cfg.distill.cache_batches = 3
  teachers = random_teachers(cfg)
  cached_cfg = copy.deepcopy(cfg)
  cached_cfg.distill.teacher_source = "cache"
  old_chunk, cache_lib.CHUNK = cache_lib.CHUNK, 2
  try:
    cache_lib.write_cache(cached_cfg, teachers, str(tmp_path), devices[:1])
  finally:
    cache_lib.CHUNK = old_chunk
  cohost = DistillExperiment(cfg, teachers, devices[:1])
  cached = DistillExperiment(cached_cfg, teachers, devices[:1], cache_dir=str(tmp_path))
  live_data, cached_data = cohost.data_iterator("train"), cached.data_iterator("train")
  live_state = cached_state = cohost.init_state()
  cached_state = cached.init_state()
  for step in range(3):
    if step == 2:  # resume the cache reader from its saved position
      position = cached_data.shard_states()
      cached_data = cached.data_iterator("train")
      cached_data.set_shard_states(position)
    live_state, live = cohost.train_step(live_state, next(live_data))
    cached_state, from_cache = cached.train_step(cached_state, next(cached_data))
    np.testing.assert_allclose(from_cache["kl"], live["kl"], rtol=1e-5)
    np.testing.assert_allclose(from_cache["loss"], live["loss"], rtol=1e-6)
  chex.assert_trees_all_close(jax.device_get(cached_state.params), jax.device_get(live_state.params),
                              rtol=1e-5, atol=1e-6)
