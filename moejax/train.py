"""Training: the loop around the pure, jitted step, and loading checkpoints.

``train_step(state, batch) -> (state, metrics)`` and ``eval_step`` are pure
functions of arrays (``moejax/step.py``), jitted once by :class:`Experiment`
(``moejax/experiment.py``). Everything with side effects (data, logging,
checkpoints, the non-finite policy, loop hooks) lives in :func:`train`, so
Colab and tests drive the same code as the CLI. This module also re-exports
the trainer's public names, so ``from moejax.train import ...`` keeps working.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import jax
import ml_collections

from moejax import config as config_lib
from moejax import console
from moejax.checkpoint import Checkpointer
from moejax.experiment import Experiment
from moejax.hooks import INJECT_NAN_ENV, ExpertCollapseWatch, LoopHook, Profile, default_hooks
from moejax import flops
from moejax.metrics import MetricsWriter, Throughput
from moejax.objective import SOWN, ExtraObjective, Forward, forward
from moejax.preemption import StopRequests
from moejax.step import TrainState, make_eval_step, make_train_step

__all__ = ["INJECT_NAN_ENV", "SOWN", "Experiment", "ExpertCollapseWatch", "ExtraObjective", "Forward", "LoopHook",
           "NonFiniteError", "TrainState", "check_workdir", "evaluate_checkpoint", "forward", "load_checkpoint",
           "make_eval_step", "make_train_step", "train"]

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf values and the config's policy says stop."""


def check_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a workdir whose checkpoints belong to a different model.

  Compared: every ``model.*`` field, ``data.tokenizer``, ``data.shards`` and
  ``optim.name`` (they fix the checkpoint's structure and meaning). Other
  fields (learning rate, steps, mesh, number of processes, ...) may change
  between runs of one workdir.
  """
  ckpt_dir, saved_path = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "config.json")
  if not os.path.isdir(ckpt_dir) or not any(n.isdigit() for n in os.listdir(ckpt_dir)):
    return
  if not os.path.exists(saved_path):
    raise config_lib.ConfigError(f"workdir {workdir} holds checkpoints but no config.json, so they cannot be "
                                 "checked against this config; use a new --workdir.")
  with open(saved_path) as f:
    saved = json.load(f)
  now = json.loads(config_lib.to_json(cfg))
  # A field the saved config predates had its (unchanged) default then.
  defaults = json.loads(config_lib.to_json(config_lib.base_config()))
  was = lambda sec, k: saved.get(sec, {}).get(k, defaults[sec].get(k))
  keys = [("model", k) for k in now["model"]] + [("data", "tokenizer"), ("data", "shards"), ("optim", "name")]
  diffs = [f"{sec}.{k} is {was(sec, k)!r} there but {now[sec][k]!r} now" for sec, k in keys if was(sec, k) != now[sec][k]]
  if diffs:
    raise config_lib.ConfigError(
        f"workdir {workdir} holds checkpoints of a different model: {'; '.join(diffs)}. "
        "Use a new --workdir, or set these fields back to resume that run.")


def train(cfg: ml_collections.ConfigDict, workdir: str, devices=None, experiment: Experiment | None = None,
          hooks: Sequence[LoopHook] | None = None, start_fresh: bool = False) -> TrainState:
  """Trains ``cfg`` in ``workdir``, resuming from its newest good checkpoint.

  Leaves ``config.json``, ``metrics.jsonl``, ``tensorboard/`` and
  ``checkpoints/`` in ``workdir``. Returns the final state (or the state at
  which a SIGTERM/SIGINT stopped the run, after checkpointing it).
  ``experiment`` (built from ``cfg``) replaces the default :class:`Experiment`,
  e.g. a distillation experiment with its own objective and data. ``hooks``
  (default :func:`moejax.hooks.default_hooks`) see each batch before its step
  and its metrics after it. If the workdir holds checkpoints and none
  restores, this raises ``UnreadableCheckpointsError`` and changes nothing,
  unless ``start_fresh``.
  """
  console.check_workdir(workdir)
  exp = experiment or Experiment(cfg, devices)
  t = cfg.train
  data = exp.data_iterator("train")
  if t.eval_every:
    exp.data_iterator("validation")  # fail now, not at the first eval, if that split is unusable
  check_workdir(cfg, workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  saved_config = console.read_saved_config(workdir)
  try:
    start, state = ckpt.restore_latest(exp.abstract_state, data, start_fresh=start_fresh)
  except BaseException:
    ckpt.close()
    raise
  restored = state is not None
  if not restored:
    start, state, data = 0, exp.init_state(), exp.data_iterator("train")  # a failed restore may have moved data
  primary = jax.process_index() == 0
  console.report_start(workdir, cfg, start if restored else None, ckpt.directory, saved_config, ckpt.skipped,
                       primary)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
  writer = MetricsWriter(workdir, start, t.steps, t.batch_size * cfg.data.seq_len,
                         throughput(cfg, exp.mesh.devices.size)) if primary else None
  hooks = default_hooks(cfg) if hooks is None else list(hooks)
  if cfg.train.profile_steps[1]:
    hooks.append(Profile(*cfg.train.profile_steps, os.path.join(workdir, "profile")))
  bad_in_a_row = 0

  try:
    with StopRequests(ckpt) as stop:
      for step in range(start + 1, t.steps + 1):
        batch = next(data)
        for hook in hooks:
          batch = hook.before_step(step, batch)
        state, metrics = exp.train_step(state, batch)
        bad_in_a_row = 0 if bool(metrics["finite"]) else bad_in_a_row + 1
        if bad_in_a_row:
          state, bad_in_a_row = _handle_nonfinite(exp, ckpt, state, step, metrics, bad_in_a_row)
        for hook in hooks:
          hook.after_step(step, metrics)
        evaluating = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
        eval_metrics = exp.evaluate(state, t.eval_batches) if evaluating else {}
        if evaluating and primary:
          console.router_summary(step, jax.device_get(metrics))
        if writer and (step % t.log_every == 0 or step == t.steps or evaluating):
          writer.write(step, {**jax.device_get(metrics), **eval_metrics,
                              **getattr(data, "source_tokens", dict)()})  # mixtures: data_tokens_NAME
        stopping = stop.should_stop(step)
        if step % t.checkpoint_every == 0 or step == t.steps or stopping:
          ckpt.save(step, state, data)
        if stopping:
          log.warning("stopped at step %d with a checkpoint; run the same command again to resume", step)
          break
  finally:
    for hook in hooks:
      if isinstance(hook, Profile):
        hook.close()
    ckpt.wait()
    ckpt.close()
    if writer:
      writer.close()
  if primary:
    console.closing_summary(workdir, cfg)
  return state


def throughput(cfg: ml_collections.ConfigDict, num_devices: int) -> Throughput | None:
  """MFU accounting of a run: ``train.peak_flops`` or the device kind's bf16 peak (None on CPU: unknown).

  None (nothing logged) for a model with a layer type moejax has no FLOP count for."""
  try:
    per_token = flops.model_flops(cfg.model, cfg.data.seq_len).train
  except KeyError as err:
    log.warning("MFU and model TFLOP/s are not logged: %s", err.args[0])
    return None
  kind = jax.devices()[0].device_kind
  peak = cfg.train.peak_flops or flops.peak_flops(kind)
  if not peak:
    log.info("MFU: unknown on %s (no peak FLOP/s for it; set --config.train.peak_flops=FLOP/s per device); "
             "model_tflops_per_s is logged", kind)
  return Throughput(per_token, num_devices, peak or None)


def _handle_nonfinite(exp: Experiment, ckpt: Checkpointer, state: TrainState, step: int, metrics,
                      bad_in_a_row: int) -> tuple[TrainState, int]:
  """Applies ``train.nonfinite`` after a step whose update was withheld.

  Returns the state to continue from and the new count of bad steps in a row.
  """
  t = exp.cfg.train
  what = (f"step {step}: loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])} "
          "is not finite; the update was not applied")
  if t.nonfinite == "stop":
    raise NonFiniteError(f"{what} and the run stops (train.nonfinite='stop'). Lower optim.learning_rate, "
                         "set optim.grad_clip_norm, or use --config.train.nonfinite=skip or rollback.")
  if bad_in_a_row < t.nonfinite_limit:
    log.warning("%s; skipped (%d in a row)", what, bad_in_a_row)
    return state, bad_in_a_row
  if t.nonfinite == "skip":
    raise NonFiniteError(f"{what}: {bad_in_a_row} non-finite steps in a row (train.nonfinite_limit="
                         f"{t.nonfinite_limit}); the model is not recovering. Lower optim.learning_rate "
                         "or try --config.train.nonfinite=rollback.")
  ckpt.wait()
  restored_step, restored = ckpt.restore_latest(exp.abstract_state)
  if restored is None:
    raise NonFiniteError(f"{what}: {bad_in_a_row} in a row and no checkpoint to roll back to.")
  log.warning("%s; %d in a row: rolled back to the checkpoint of step %d, data continues after step %d",
              what, bad_in_a_row, restored_step, step)
  return restored, 0


def load_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, devices=None):
  """(Experiment, step, state) of the newest good checkpoint in ``workdir``."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    raise FileNotFoundError(f"no checkpoint in {directory}; train first with "
                            f"`moejax train --workdir {workdir} ...`.")
  exp = Experiment(cfg, devices)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    step, state = ckpt.restore_latest(exp.abstract_state)
  finally:
    ckpt.close()
  console.say(f"moejax: using the checkpoint of step {step} ({os.path.join(ckpt.directory, str(step))})"
              + (", not the newest: see the warnings above" if ckpt.skipped else ""))
  return exp, step, state


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, float]:
  """Validation metrics of the latest checkpoint in ``workdir``."""
  exp, step, state = load_checkpoint(cfg, workdir, devices)
  return {"step": step, **exp.evaluate(state, cfg.train.eval_batches)}
