"""Routing record / replay: bit-identical routing, own-routing replay changes nothing, replay during a run."""

import os

import numpy as np
import pytest

from moejax.lab.replay import (
  RecordingExperiment,
  ReplayExperiment,
  load_routing,
  record_routing,
  routing_of,
  step_path,
  with_routing,
)
from moejax.train import Experiment, train
from tests.lab.helpers import tiny_lab_cfg

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


@pytest.fixture(scope="module")
def two_models(devices):
  cfg_a = tiny_lab_cfg(score="sigmoid", score_bias=True)
  cfg_b = tiny_lab_cfg(score="sigmoid", score_bias=True)
  cfg_b.seed = 7
  exp_a, exp_b = Experiment(cfg_a, devices[:1]), Experiment(cfg_b, devices[:1])
  data = exp_a.data_iterator("validation")
  return exp_a, exp_a.init_state(), exp_b, exp_b.init_state(), [next(data) for _ in range(2)]


def test_replayed_routing_is_the_record_bit_for_bit(two_models):
  exp_a, state_a, exp_b, state_b, batches = two_models
  record = record_routing(exp_a, state_a, batches)
  for batch, routing in zip(batches, record):
    own = routing_of(exp_b, state_b, batch)
    assert not np.array_equal(own["layer_1/mlp"], routing["layer_1/mlp"])  # B would route otherwise
    replayed = routing_of(exp_b, state_b, with_routing(batch, routing))
    assert replayed.keys() == routing.keys()
    for layer in routing:
      np.testing.assert_array_equal(replayed[layer], routing[layer])


def test_replaying_a_models_own_routing_changes_nothing(two_models):
  exp_a, state_a, _, _, batches = two_models
  (routing,) = record_routing(exp_a, state_a, batches[:1])
  ce, correct = exp_a.token_stats(state_a, batches[0])
  ce_replayed, correct_replayed = exp_a.token_stats(state_a, with_routing(batches[0], routing))
  np.testing.assert_array_equal(ce_replayed, ce)
  np.testing.assert_array_equal(correct_replayed, correct)


def test_record_during_a_run_and_replay_it_in_another(tmp_path, devices):
  cfg = tiny_lab_cfg(steps=3, score="sigmoid", score_bias=True)
  rec = str(tmp_path / "rec")
  train(cfg, str(tmp_path / "a"), experiment=RecordingExperiment(cfg, rec, devices[:1]))
  assert sorted(os.listdir(rec)) == [os.path.basename(step_path(rec, s)) for s in (1, 2, 3)]

  cfg_b = tiny_lab_cfg(steps=3, score="sigmoid", score_bias=True)
  cfg_b.seed = 7
  replay = ReplayExperiment(cfg_b, rec, devices[:1])
  seen = []
  original_step = Experiment.train_step

  def spy(self, state, batch):  # the routing each replayed step actually used
    seen.append(routing_of(self, state, batch))
    return original_step(self, state, batch)

  Experiment.train_step = spy
  try:
    train(cfg_b, str(tmp_path / "b"), experiment=replay)
  finally:
    Experiment.train_step = original_step
  assert len(seen) == 3
  for step, used in enumerate(seen, start=1):
    recorded = load_routing(step_path(rec, step))
    np.testing.assert_array_equal(used["layer_1/mlp"], recorded["layer_1/mlp"])
