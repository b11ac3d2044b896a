"""Training: the pure, jitted ``train_step``/``eval_step`` and the loop around them.

``train_step(state, batch) -> (state, metrics)`` and ``eval_step(state, batch)
-> sums`` are pure functions of arrays, jitted once with explicit shardings.
Everything with side effects (data, logging, checkpoints) lives in
:func:`train`, so Colab and tests drive the same code as the CLI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from moejax import config as config_lib
from moejax.checkpoint import Checkpointer, abstract_like
from moejax.data import make_iterator
from moejax.metrics import MetricsWriter
from moejax.models import build_model
from moejax.models.state import update_model_state
from moejax.optim import build_optimizer
from moejax.sharding import LOGICAL_RULES, batch_sharding, logical_sharding, make_mesh, put_batch

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-trainable variable collections (empty for dense models)


SOWN = ("aux_loss", "stats", "metrics")


def _apply(model: nn.Module, params, model_state, batch: Batch):
  """Logits [B, T, V] and the sown collections.

  ``aux_loss``: scalars added to the objective; ``stats``: statistics for
  model-state updates (see ``moejax/models/state.py``); ``metrics``: scalars
  to log, named by their module path.
  """
  logits_BxTxV, sown = model.apply({"params": params, **model_state}, batch["inputs"],
                                   batch["positions"], batch["segment_ids"], mutable=list(SOWN))
  aux = sum((jnp.sum(x) for x in jax.tree.leaves(sown.get("aux_loss", {}))), jnp.zeros((), jnp.float32))
  return logits_BxTxV, aux, dict(sown.get("stats", {})), _flat_metrics(sown.get("metrics", {}))


def _flat_metrics(tree) -> dict[str, jax.Array]:
  """{"layer_1/mlp/load_max": scalar, ...} from a sown ``metrics`` tree."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    flat[name] = jnp.mean(leaf.astype(jnp.float32))
  return flat


def _token_losses(logits_BxTxV, batch: Batch):
  """Per-token cross-entropy [B, T] (float32) and its weights."""
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), batch["targets"])
  return ce_BxT, batch["weights"].astype(jnp.float32)


def _split_micro(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...]; micro-batch i takes rows i, i+n, ..., so each
  device keeps its own rows in every micro-batch."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
  """The pure train step; gradients accumulate over ``grad_accum_steps``.

  The objective is the token-weighted mean cross-entropy over the *whole*
  batch plus the mean of the sown auxiliary losses, so accumulation gives the
  same update as one big batch.
  """

  def train_step(state: TrainState, batch: Batch):
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def micro_loss(params, micro: Batch):
      logits, aux, stats, layer_metrics = _apply(model, params, state.model_state, micro)
      ce_BxT, w_BxT = _token_losses(logits, micro)
      ce_sum = jnp.sum(ce_BxT * w_BxT)
      return ce_sum / total_weight + aux / grad_accum_steps, (ce_sum, aux, stats, layer_metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    micros = _split_micro(batch, grad_accum_steps)

    def accumulate(carry, micro: Batch):
      (_, sums), grads = grad_fn(state.params, micro)
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micros))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
    (grads, (ce_sum, aux_sum, stats, layer_metrics)), _ = jax.lax.scan(accumulate, zeros, micros)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = update_model_state(state.model_state, stats, model.cfg)
    ce = ce_sum / total_weight
    aux = aux_sum / grad_accum_steps
    metrics = {"loss": ce, "aux_loss": aux, "total_loss": ce + aux, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "learning_rate": schedule(state.step),
               "tokens": total_weight, **{k: v / grad_accum_steps for k, v in layer_metrics.items()}}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable[[TrainState, Batch], dict]:
  """Sums of weighted loss, weight and correct argmax predictions on a batch."""

  def eval_step(params, model_state, batch: Batch):
    logits = _apply(model, params, model_state, batch)[0]
    ce_BxT, w_BxT = _token_losses(logits, batch)
    correct_BxT = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(ce_BxT * w_BxT), "weight_sum": jnp.sum(w_BxT),
            "correct_sum": jnp.sum(correct_BxT * w_BxT)}

  return eval_step


class Experiment:
  """The model, optimizer, mesh and jitted steps for one config.

  Built once; :func:`train` and :func:`evaluate` (and notebooks) use it.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, devices=None):
    devices = list(jax.devices() if devices is None else devices)
    config_lib.validate(cfg, num_devices=len(devices))
    self.cfg = cfg
    self.mesh = make_mesh(cfg.mesh, devices)
    self.model = build_model(cfg.model)
    self.tx, self.schedule = build_optimizer(cfg.optim, cfg.train.steps)

    boxed = jax.eval_shape(self._boxed_init, jax.random.key(0))
    self.state_shardings = logical_sharding(self.mesh, boxed)
    self.abstract_state = abstract_like(nn.meta.unbox(boxed), self.state_shardings)

    batch_shard = batch_sharding(self.mesh)
    self._train_step = jax.jit(
        make_train_step(self.model, self.tx, self.schedule, cfg.train.grad_accum_steps),
        in_shardings=(self.state_shardings, batch_shard),
        out_shardings=(self.state_shardings, None), donate_argnums=0)
    self._eval_step = jax.jit(make_eval_step(self.model),
                              in_shardings=(self.state_shardings.params, self.state_shardings.model_state,
                                            batch_shard))

  def _boxed_init(self, rng) -> TrainState:
    dummy = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
    variables = {k: v for k, v in self.model.init(rng, dummy).items() if k not in SOWN}
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      model_state=variables)

  @contextlib.contextmanager
  def _context(self):
    """The mesh plus the logical-axis rules, for tracing model code."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
      yield

  def init_state(self) -> TrainState:
    """Fresh state, initialised directly in its sharded layout."""
    with self._context():
      init = jax.jit(lambda rng: nn.meta.unbox(self._boxed_init(rng)), out_shardings=self.state_shardings)
      return init(jax.random.key(self.cfg.seed))

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    with self._context():
      return self._train_step(state, put_batch(batch, self.mesh))

  def eval_sums(self, state: TrainState, batches) -> dict[str, float]:
    """Sums over ``batches`` (host numpy dicts) of loss, weight, correct."""
    totals = {"loss_sum": 0.0, "weight_sum": 0.0, "correct_sum": 0.0}
    with self._context():
      for batch in batches:
        sums = jax.device_get(self._eval_step(state.params, state.model_state, put_batch(batch, self.mesh)))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    return totals

  def per_process_batch(self) -> int:
    return self.cfg.train.batch_size // jax.process_count()

  def data_iterator(self, split: str):
    return make_iterator(self.cfg.data, split=split, batch_size=self.per_process_batch(),
                         seed=self.cfg.seed, process_index=jax.process_index(),
                         process_count=jax.process_count())

  def evaluate(self, state: TrainState, num_batches: int) -> dict[str, float]:
    """Validation loss, perplexity and token accuracy on the first batches."""
    it = self.data_iterator("validation")
    sums = self.eval_sums(state, (next(it) for _ in range(num_batches)))
    weight = max(sums["weight_sum"], 1.0)
    loss = sums["loss_sum"] / weight
    return {"eval_loss": loss, "eval_perplexity": float(jnp.exp(loss)),
            "eval_accuracy": sums["correct_sum"] / weight, "eval_tokens": sums["weight_sum"]}


def train(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
  """Trains ``cfg`` in ``workdir``, resuming from its latest checkpoint.

  Leaves ``config.json``, ``metrics.jsonl``, ``tensorboard/`` and
  ``checkpoints/`` in ``workdir``. Returns the final state.
  """
  exp = Experiment(cfg, devices)
  t = cfg.train
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
  data = exp.data_iterator("train")

  start = ckpt.latest_step()
  if start is None:
    start, state = 0, exp.init_state()
  else:
    state = ckpt.restore(start, exp.abstract_state, data)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
  writer = MetricsWriter(workdir, start, t.steps, t.batch_size * cfg.data.seq_len) \
      if jax.process_index() == 0 else None

  for step in range(start + 1, t.steps + 1):
    state, metrics = exp.train_step(state, next(data))
    evaluating = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
    eval_metrics = exp.evaluate(state, t.eval_batches) if evaluating else {}
    if writer and (step % t.log_every == 0 or step == t.steps or evaluating):
      writer.write(step, {**jax.device_get(metrics), **eval_metrics})
    if step % t.checkpoint_every == 0 or step == t.steps:
      ckpt.save(step, state, data)
  ckpt.wait()
  ckpt.close()
  if writer:
    writer.close()
  return state


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, float]:
  """Validation metrics of the latest checkpoint in ``workdir``."""
  exp = Experiment(cfg, devices)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first with "
                            f"`moejax train --workdir {workdir} ...`.")
  state = ckpt.restore(step, exp.abstract_state)
  ckpt.close()
  return {"step": step, **exp.evaluate(state, cfg.train.eval_batches)}
