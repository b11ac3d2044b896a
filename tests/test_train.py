"""Training: learning, sharded == unsharded, accumulation, exact resume."""

import json
import os
import types

import chex
import jax
import numpy as np
import pytest

from moejax.config import base_config
from moejax.train import Experiment, train


def small_train_cfg(source="copy", **train_fields):
  cfg = base_config()
  cfg.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, ffn_dim=128)
  cfg.data.update(source=source, seq_len=64, task_length=32)
  cfg.train.update(steps=6, batch_size=8, log_every=1, eval_every=0, checkpoint_every=2)
  cfg.train.update(train_fields)
  cfg.optim.update(learning_rate=3e-3, warmup_steps=2)
  return cfg


def _run_steps(cfg, devices, n):
  exp = Experiment(cfg, devices)
  state, data = exp.init_state(), exp.data_iterator("train")
  losses = []
  for _ in range(n):
    state, metrics = exp.train_step(state, next(data))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=2, context=4), dict(data=2, tensor=4)])
def test_sharded_training_equals_single_device(devices, mesh):
  cfg = small_train_cfg()
  cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=1)
  single_losses, single_params = _run_steps(cfg, devices[:1], 3)
  cfg.mesh.update(mesh)
  sharded_losses, sharded_params = _run_steps(cfg, devices, 3)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  chex.assert_trees_all_close(sharded_params, single_params, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_one_big_batch(devices):
  cfg = small_train_cfg()
  full_losses, full_params = _run_steps(cfg, devices[:1], 2)
  cfg.train.grad_accum_steps = 4
  accum_losses, accum_params = _run_steps(cfg, devices[:1], 2)
  np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
  chex.assert_trees_all_close(accum_params, full_params, rtol=1e-4, atol=1e-6)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_resume_after_a_crash_is_bit_exact(tmp_path, devices, monkeypatch):
  cfg = small_train_cfg(steps=6, checkpoint_every=2)
  straight = train(cfg, str(tmp_path / "straight"), devices[:1])

  from moejax import checkpoint

  real_save = checkpoint.Checkpointer.save

  def crash_after_step_4(self, step, *args, **kwargs):
    real_save(self, step, *args, **kwargs)
    if step == 4:
      self.wait()
      raise KeyboardInterrupt("simulated crash")

  monkeypatch.setattr(checkpoint.Checkpointer, "save", crash_after_step_4)
  with pytest.raises(KeyboardInterrupt):
    train(cfg, str(tmp_path / "resumed"), devices[:1])
  monkeypatch.undo()
  resumed = train(cfg, str(tmp_path / "resumed"), devices[:1])

  chex.assert_trees_all_equal(jax.device_get(resumed.params), jax.device_get(straight.params))
  a, b = _jsonl(tmp_path / "straight" / "metrics.jsonl"), _jsonl(tmp_path / "resumed" / "metrics.jsonl")
  assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  # The rerun restored the checkpoint of step 4, the last one written before the crash.
  from moejax.console import read_runs

  assert [(r["status"], r["restored_step"]) for r in read_runs(str(tmp_path / "resumed"))] == [
      ("fresh", 0), ("resumed", 4)]


def test_workdir_holds_config_metrics_tensorboard_and_checkpoints(tmp_path, devices):
  cfg = small_train_cfg(steps=4, checkpoint_every=2, eval_every=2, eval_batches=2, keep_checkpoints=1)
  train(cfg, str(tmp_path), devices[:1])
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["steps"] == 4
  records = _jsonl(tmp_path / "metrics.jsonl")
  assert all({"step", "loss", "learning_rate", "tokens_per_s"} <= r.keys() for r in records)
  assert {"eval_loss", "eval_accuracy"} <= records[1].keys()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


@pytest.mark.slow
@pytest.mark.parametrize("source,steps,ratio", [("copy", 150, 0.6), ("stdlib", 150, 0.6)])
def test_loss_falls_on_embedded_sources(tmp_path, devices, source, steps, ratio):
  cfg = small_train_cfg(source, steps=steps, log_every=10, checkpoint_every=steps)
  cfg.optim.warmup_steps = 20
  train(cfg, str(tmp_path), devices[:1])
  losses = [r["loss"] for r in _jsonl(tmp_path / "metrics.jsonl")]
  assert losses[-1] < ratio * losses[0], losses


def test_expert_collapse_warning_fires_once_per_collapse():
  from moejax.train import ExpertCollapseWatch

  watch = ExpertCollapseWatch(patience=3)
  healthy, starved = np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.5, 0.0, 1.5, 1.0])
  loads = [starved] * 4 + [healthy] + [starved] * 3
  fired = [watch.update(step, {"layer_1/mlp/expert_load": load, "loss": 1.0}) for step, load in enumerate(loads, 1)]
  assert [len(w) for w in fired] == [0, 0, 1, 0, 0, 0, 0, 1]
  assert "layer_1/mlp experts [1] (1 of 4)" in fired[2][0] and "model.moe.score_bias" in fired[2][0]
  # Several experts of one layer collapsing together: one line for the layer, one per layer.
  two_dead = np.array([2.0, 0.0, 0.0, 2.0])
  watch = ExpertCollapseWatch(patience=2)
  fired = [watch.update(step, {"layer_1/mlp/expert_load": two_dead, "layer_2/mlp/expert_load": two_dead})
           for step in (1, 2)]
  assert fired[0] == [] and len(fired[1]) == 2
  assert "step 2: layer_1/mlp experts [1, 2] (2 of 4)" in fired[1][0] and "layer_2/mlp experts [1, 2]" in fired[1][1]
  assert ExpertCollapseWatch(patience=0).update(1, {"layer_1/mlp/expert_load": starved}) == []


def test_eta_counts_from_the_first_logged_step_not_from_compilation(tmp_path, monkeypatch, capsys):
  from moejax import metrics as metrics_lib

  # Clock reads: opening, step 1 logged after a 100 s compile, step 2 logged 2 s later, the ETA's own read.
  clock = iter([0.0, 100.0, 102.0, 102.0])
  monkeypatch.setattr(metrics_lib, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  writer = metrics_lib.MetricsWriter(str(tmp_path), 0, 11, 16)
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.9})  # 1 step in 2 s since step 1: 9 steps left -> 18 s
  writer.close()
  lines = capsys.readouterr().err.splitlines()
  assert lines[0].endswith("eta=?") and lines[1].endswith("eta=18s")


def test_start_line_and_run_record_for_a_finished_run(tmp_path, devices, capsys):
  from moejax.console import read_runs

  cfg = small_train_cfg(steps=2, checkpoint_every=2)
  train(cfg, str(tmp_path), devices[:1])
  train(cfg, str(tmp_path), devices[:1])
  err = capsys.readouterr().err
  assert "starting fresh: step 0 of 2" in err
  assert f"already finished at step 2 (train.steps=2; checkpoint {tmp_path / 'checkpoints' / '2'})" in err
  assert [(r["status"], r["restored_step"]) for r in read_runs(str(tmp_path))] == [("fresh", 0), ("finished", 2)]
  assert [r["step"] for r in _jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
