"""In-process faults: NaN/Inf steps under each policy, corrupted checkpoints,
and restoring onto other meshes."""

import os

import chex
import jax
import numpy as np
import pytest

from moejax import checkpoint
from moejax.checkpoint import Checkpointer
from moejax.train import INJECT_NAN_ENV, Experiment, NonFiniteError, train
from tests.test_train import small_train_cfg


def _cfg(**train_fields):
  cfg = small_train_cfg(steps=8, checkpoint_every=2, **train_fields)
  cfg.train.keep_checkpoints = 4
  return cfg


def _assert_finite_checkpoints(workdir):
  ckpt = Checkpointer(str(workdir), keep=10)
  exp = Experiment(_cfg(), jax.devices()[:1])
  for step in ckpt.all_steps():
    chex.assert_tree_all_finite(ckpt.restore(step, exp.abstract_state).params)
  return ckpt.all_steps()


def test_skip_policy_withholds_bad_updates_and_counts_them(tmp_path, devices, monkeypatch):
  monkeypatch.setenv(INJECT_NAN_ENV, "3,5")
  state = train(_cfg(nonfinite="skip"), str(tmp_path), devices[:1])
  assert int(state.nonfinite_steps) == 2
  chex.assert_tree_all_finite(state.params)
  assert _assert_finite_checkpoints(tmp_path) == [2, 4, 6, 8]


def test_skipped_update_leaves_the_state_untouched(devices):
  exp = Experiment(_cfg(), devices[:1])
  state, data = exp.init_state(), exp.data_iterator("train")
  batch = next(data)
  before = jax.device_get(state)
  poisoned = dict(batch, weights=np.full_like(batch["weights"], np.inf))
  after, metrics = exp.train_step(state, poisoned)
  assert not bool(metrics["finite"])
  chex.assert_trees_all_equal(jax.device_get(after.params), before.params)
  chex.assert_trees_all_equal(jax.device_get(after.opt_state), before.opt_state)


def test_stop_policy_raises_and_never_saves_a_bad_state(tmp_path, devices, monkeypatch):
  monkeypatch.setenv(INJECT_NAN_ENV, "5")
  with pytest.raises(NonFiniteError, match=r"step 5: loss=nan.*train\.nonfinite='stop'"):
    train(_cfg(nonfinite="stop"), str(tmp_path), devices[:1])
  assert _assert_finite_checkpoints(tmp_path) == [2, 4]


def test_skip_policy_gives_up_after_the_limit(tmp_path, devices, monkeypatch):
  monkeypatch.setenv(INJECT_NAN_ENV, "3,4,5")
  with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row"):
    train(_cfg(nonfinite="skip", nonfinite_limit=3), str(tmp_path), devices[:1])
  assert _assert_finite_checkpoints(tmp_path) == [2, 4]  # skipped steps leave a finite state


def test_rollback_policy_reloads_the_last_checkpoint(tmp_path, devices, monkeypatch):
  monkeypatch.setenv(INJECT_NAN_ENV, "5,6")
  state = train(_cfg(nonfinite="rollback", nonfinite_limit=2), str(tmp_path), devices[:1])
  # Rolled back to step 4 after the bad steps 5 and 6, then steps 7 and 8 ran.
  assert int(state.step) == 6
  chex.assert_tree_all_finite(state.params)
  _assert_finite_checkpoints(tmp_path)


def test_corrupted_newest_checkpoint_falls_back_exactly(tmp_path, devices, monkeypatch):
  cfg = _cfg()
  straight = train(cfg, str(tmp_path / "straight"), devices[:1])

  real_save = checkpoint.Checkpointer.save

  def crash_after_step_6(self, step, *args, **kwargs):
    real_save(self, step, *args, **kwargs)
    if step == 6:
      self.wait()
      raise KeyboardInterrupt("simulated crash")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", crash_after_step_6)
  with pytest.raises(KeyboardInterrupt):
    train(cfg, str(tmp_path / "run"), devices[:1])
  monkeypatch.undo()
  state_dir = tmp_path / "run" / "checkpoints" / "6" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.write(os.urandom(max(os.path.getsize(path), 16)))
  resumed = train(cfg, str(tmp_path / "run"), devices[:1])
  chex.assert_trees_all_equal(jax.device_get(resumed.params), jax.device_get(straight.params))
  assert (tmp_path / "run" / "checkpoints_set_aside" / "6").is_dir()


@pytest.mark.multidevice
def test_restore_onto_other_meshes_gives_the_same_parameters(tmp_path, devices):
  cfg = _cfg()
  cfg.mesh.update(data=1, fsdp=8)
  exp = Experiment(cfg, devices)
  state, data = exp.init_state(), exp.data_iterator("train")
  state, _ = exp.train_step(state, next(data))
  saver = Checkpointer(str(tmp_path), keep=1)
  saver.save(1, state)
  saver.wait()
  saved = jax.device_get(state)
  for mesh, n in [(dict(fsdp=2, expert=4), 8), (dict(data=2, tensor=4), 8), ({}, 1)]:
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1, expert=1, context=1))
    cfg.mesh.update(mesh)
    other = Experiment(cfg, devices[:n])
    step, restored = Checkpointer(str(tmp_path), keep=1).restore_latest(other.abstract_state)
    assert step == 1
    chex.assert_trees_all_equal(jax.device_get(restored), saved)
    leaf = restored.params["layer_0"]["mlp"]["w_gate"]
    assert leaf.sharding == other.state_shardings.params["layer_0"]["mlp"]["w_gate"]


def test_checkpoint_of_another_structure_is_an_error_and_is_kept(tmp_path, devices):
  from moejax.checkpoint import CheckpointMismatchError

  cfg = _cfg()
  exp = Experiment(cfg, devices[:1])
  saver = Checkpointer(str(tmp_path), keep=1)
  saver.save(1, exp.init_state())
  saver.wait()
  cfg.model.num_layers = 3
  with pytest.raises(CheckpointMismatchError, match=r"only in the model: \['opt_state/.*layer_2"):
    Checkpointer(str(tmp_path), keep=1).restore_latest(Experiment(cfg, devices[:1]).abstract_state)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  assert not (tmp_path / "checkpoints_set_aside").exists()
