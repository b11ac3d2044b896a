"""In-process faults: NaN/Inf steps under each policy, corrupted checkpoints,
and restoring onto other meshes."""

import logging
import os

import chex
import jax
import numpy as np
import pytest

from moejax import checkpoint
from moejax.checkpoint import Checkpointer, UnreadableCheckpointsError, describe_error
from moejax.console import read_runs
from moejax.train import INJECT_NAN_ENV, Experiment, NonFiniteError, evaluate_checkpoint, train
from tests.test_train import small_train_cfg

pytestmark = pytest.mark.slow(minutes=5)  # on 2 cores; the longest modules start first (tests/conftest.py)


def _cfg(steps=8, **train_fields):
  cfg = small_train_cfg(steps=steps, checkpoint_every=2, **train_fields)
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
  # The run says what it restored: the newest readable checkpoint (4), 2 steps before the crash at 6.
  first, second = read_runs(str(tmp_path / "run"))
  assert (first["status"], first["restored_step"]) == ("fresh", 0)
  assert (second["status"], second["restored_step"]) == ("resumed", 4)
  assert second["checkpoint"].endswith(os.path.join("checkpoints", "4"))
  assert "checkpoints/6 is unreadable" in second["set_aside"][0]


def _corrupt(checkpoint_dir):
  """Overwrites the array data of a checkpoint (its metadata stays readable)."""
  for root, _, files in os.walk(checkpoint_dir / "state"):
    for name in files:
      if name not in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding") and "array_metadatas" not in root:
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.write(os.urandom(max(os.path.getsize(path), 16)))


def _snapshot(workdir):
  return {os.path.relpath(os.path.join(root, n), workdir): open(os.path.join(root, n), "rb").read()
          for root, _, files in os.walk(workdir) for n in files}


def test_all_checkpoints_unreadable_stops_and_changes_nothing(tmp_path, devices, capsys):
  cfg = _cfg(steps=4)
  train(cfg, str(tmp_path), devices[:1])
  for step in ("2", "4"):
    _corrupt(tmp_path / "checkpoints" / step)
  before = _snapshot(tmp_path)
  cfg.train.steps = 6
  with pytest.raises(UnreadableCheckpointsError) as err:
    train(cfg, str(tmp_path), devices[:1])
  message = str(err.value)
  for step in ("2", "4"):
    assert os.path.join(str(tmp_path), "checkpoints", step) + " (ValueError: DATA_LOSS" in message
  assert "backup" in message and "--start_fresh" in message and "pybind11" not in message
  assert _snapshot(tmp_path) == before  # metrics.jsonl, tensorboard/, checkpoints/ and runs.jsonl untouched
  capsys.readouterr()

  train(cfg, str(tmp_path), devices[:1], start_fresh=True)  # the explicit choice: begin again
  assert sorted(os.listdir(tmp_path / "checkpoints_set_aside")) == ["2", "4"]
  assert read_runs(str(tmp_path))[-1]["status"] == "fresh"
  assert "starting fresh: step 0 of 6" in capsys.readouterr().err


def test_eval_of_a_corrupt_newest_checkpoint_says_which_step_it_used(tmp_path, devices, capsys, caplog):
  cfg = _cfg(steps=4)
  train(cfg, str(tmp_path), devices[:1])
  _corrupt(tmp_path / "checkpoints" / "4")
  capsys.readouterr()
  with caplog.at_level(logging.WARNING, logger="moejax.checkpoint"):
    assert evaluate_checkpoint(cfg, str(tmp_path), devices[:1])["step"] == 2
  assert "checkpoints/4 is unreadable (ValueError: DATA_LOSS" in caplog.text
  err = capsys.readouterr().err
  assert "using the checkpoint of step 2" in err and "not the newest: see the warnings above" in err


def test_unreadable_checkpoint_errors_name_the_real_cause():
  def raise_chain():
    try:
      raise OSError("Error reading local file /w/checkpoints/4/state/d/abc: unexpected end of file")
    except OSError as cause:
      raise ValueError("<bound method pybind11_detail_function_record_v1_system_libstdcpp.__repr__>") from cause

  with pytest.raises(ValueError) as err:
    raise_chain()
  assert describe_error(err.value) == ("OSError: Error reading local file /w/checkpoints/4/state/d/abc: "
                                       "unexpected end of file")
  assert describe_error(ValueError("DATA_LOSS: bad\n  crc")) == "ValueError: DATA_LOSS: bad crc"


def test_asyncio_never_retrieved_future_noise_is_silenced(caplog):
  import asyncio
  import gc

  async def failing():
    raise ValueError("a failed TensorStore read")

  async def start_and_drop():
    task = asyncio.ensure_future(failing())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    del task

  with caplog.at_level(logging.ERROR, logger="asyncio"):
    asyncio.run(start_and_drop())
    gc.collect()
  assert not [r for r in caplog.records if r.name == "asyncio"]


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


def test_only_late_reads_on_a_closed_loop_are_dropped_from_unraisable_reports():
  """A read that completes after its failed restore closed Orbax's loop is dropped;
  any other unraisable exception still reaches the previous hook."""
  import asyncio
  import sys
  import types

  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as err:
    late = types.SimpleNamespace(exc_value=err, exc_traceback=err.__traceback__)
  try:
    raise RuntimeError("Event loop is closed")
  except RuntimeError as err:
    elsewhere = types.SimpleNamespace(exc_value=err, exc_traceback=err.__traceback__)
  assert checkpoint._late_read_of_failed_restore(late)
  assert not checkpoint._late_read_of_failed_restore(elsewhere)
  assert getattr(sys.unraisablehook, "moejax_late_reads", False)
