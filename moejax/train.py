"""Training: the pure, jitted ``train_step``/``eval_step`` and the loop around them.

``train_step(state, batch) -> (state, metrics)`` and ``eval_step(state, batch)
-> sums`` are pure functions of arrays, jitted once with explicit shardings.
Everything with side effects (data, logging, checkpoints) lives in
:func:`train`, so Colab and tests drive the same code as the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moejax import config as config_lib
from moejax.checkpoint import Checkpointer, abstract_like
from moejax.data import ShardedBatches
from moejax.layers.moe import EXPERT_LOAD_METRIC
from moejax.layers.routers import replay_variables
from moejax.losses import chunked_token_stats
from moejax.metrics import MetricsWriter
from moejax.models import Hidden, build_model
from moejax.models.block import remat_compiler_options
from moejax.models.mtp import mtp_targets
from moejax.models.state import update_model_state
from moejax.optim import ParamLayout, build_optimizer, optimizer_metrics
from moejax.optim.registry import layer_name, path_str
from moejax.preemption import StopRequests
from moejax.sharding import LOGICAL_RULES, batch_sharding, logical_sharding, make_mesh, put_batch

Batch = dict[str, jax.Array]
log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-trainable variable collections (empty for dense models)
  nonfinite_steps: jax.Array  # updates skipped because the loss or a gradient was NaN/Inf


# Sown collections: aux_loss (added to the loss), stats (summed over micro-batches, for
# moejax/models/state.py), metrics (logged), max_stats (maxed over micro-batches; attention's
# "max_logit" [H] feeds QK-clip and is logged per layer).
SOWN = ("aux_loss", "stats", "metrics", "max_stats")


class Forward(NamedTuple):
  """One forward pass: per-token results and what the layers sowed."""

  ce_BxT: jax.Array       # float32 cross-entropy of each target
  correct_BxT: jax.Array  # float32 1.0 where the argmax is the target
  mtp_ce_BxKxT: jax.Array       # float32 cross-entropy of each MTP depth's target (K = model.mtp.depth)
  mtp_weights_BxKxT: jax.Array  # their weights (0 past the row / across documents; see models/mtp.py)
  aux_loss: jax.Array     # sum of the sown auxiliary losses
  stats: dict             # for model-state updates (see moejax/models/state.py)
  metrics: dict           # scalars to log, named by module path
  max_logits: dict        # {"layer_0/attention": float32 [H]} per-head max attention logit
  hidden: Hidden          # final normed hidden states and output matrix (for distillation)
  experts: dict           # {"layer_1/mlp": int32 [B, T, K]} routed experts (only with capture_experts)


def _forward(model: nn.Module, params, model_state, batch: Batch, loss_chunk: int,
             capture_experts: bool = False) -> Forward:
  """Runs the model; logits are formed ``loss_chunk`` positions at a time.

  ``capture_experts`` also returns each MoE layer's routed experts (the
  output of every module named ``router``).
  """
  capture = (lambda module, _: module.name == "router") if capture_experts else False
  hidden, sown = model.apply(
      {"params": params, **model_state, **replay_variables(batch)},  # moejax/lab/replay.py
      batch["inputs"], batch["positions"], batch["segment_ids"],
      return_hidden=True, mutable=list(SOWN), capture_intermediates=capture)
  ce_BxT, correct_BxT = chunked_token_stats(hidden.x_BxTxD, hidden.head_DxV, batch["targets"], loss_chunk)
  mtp_y_BxKxT, mtp_w_BxKxT = mtp_targets(batch["targets"], batch["weights"], batch["segment_ids"],
                                         len(hidden.mtp))
  mtp_ce = [chunked_token_stats(h_BxTxD, hidden.head_DxV, mtp_y_BxKxT[:, k], loss_chunk)[0]
            for k, h_BxTxD in enumerate(hidden.mtp)]
  mtp_ce_BxKxT = jnp.stack(mtp_ce, axis=1) if mtp_ce else jnp.zeros_like(mtp_w_BxKxT)
  aux = sum((jnp.sum(x) for x in jax.tree.leaves(sown.get("aux_loss", {}))), jnp.zeros((), jnp.float32))
  return Forward(ce_BxT, correct_BxT, mtp_ce_BxKxT, mtp_w_BxKxT, aux, dict(sown.get("stats", {})),
                 _flat_metrics(sown.get("metrics", {})), _module_maxima(sown.get("max_stats", {})), hidden,
                 _routed_experts(sown.get("intermediates", {}), batch["inputs"].shape))


def _routed_experts(tree, shape_BxT) -> dict[str, jax.Array]:
  """{"layer_1/mlp": expert_BxTxK} from captured router outputs ``(expert_NxK, weight_NxK, aux)``."""
  experts = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]:
    module = path_str(path).split("/router/", 1)[0]
    experts[module] = leaf[0][0].reshape(*shape_BxT, -1)
  return experts


def _flat_metrics(tree) -> dict[str, jax.Array]:
  """{"layer_1/mlp/load_max_over_mean": scalar, ...} from a sown ``metrics`` tree.

  Vectors stay vectors (e.g. ``layer_1/mlp/expert_load`` [E]); anything else is averaged.
  """
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    leaf = leaf.astype(jnp.float32)
    flat[name] = leaf if leaf.ndim == 1 else jnp.mean(leaf)
  return flat


def _module_maxima(tree) -> dict[str, jax.Array]:
  """{"layer_0/attention": max_H} from sown ``max_stats`` (max over repeated sows)."""
  maxima: dict[str, jax.Array] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    module = path_str(path).rsplit("/", 2)[0]  # drop "max_logit/<sow index>"
    leaf = leaf.astype(jnp.float32)
    maxima[module] = jnp.maximum(maxima[module], leaf) if module in maxima else leaf
  return maxima


def _per_layer_rms(updates) -> dict[str, jax.Array]:
  """{"layer_0/update_rms": RMS of the parameter change over that top-level module}."""
  sums: dict[str, list] = {}
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    entry = sums.setdefault(f"{layer_name(path_str(path))}/update_rms", [0.0, 0])
    entry[0] = entry[0] + jnp.sum(jnp.square(u.astype(jnp.float32)))
    entry[1] += u.size
  return {k: jnp.sqrt(total / count) for k, (total, count) in sums.items()}


def _split_micro(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...]; micro-batch i takes rows i, i+n, ..., so each
  device keeps its own rows in every micro-batch."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


class ExtraObjective(Protocol):
  """A term added to the language-modelling objective (e.g. distillation, ``moejax/distill``).

  ``train_step(state, batch, extra)`` passes ``extra`` (arrays the term needs
  but does not train, e.g. frozen teacher parameters) to :meth:`term` for each
  micro-batch; the term's ``sums`` are added over micro-batches and turned
  into logged metrics by :meth:`metrics`.
  """

  ce_weight: float        # weight of the token cross-entropy in the objective (plain training: 1)
  capture_experts: bool   # whether term() reads ``out.experts`` (MoE routing)

  def term(self, extra, micro: Batch, out: Forward, total_weight: jax.Array) -> tuple[jax.Array, dict]:
    """(objective term of this micro-batch, already divided by the batch's ``total_weight``; sums)."""

  def metrics(self, sums: dict, total_weight: jax.Array) -> dict:
    """Logged metrics from the sums over the whole batch; ``extra_loss`` (the term over the
    whole batch) is added to ``total_loss``."""


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int, loss_chunk: int, extra_objective: ExtraObjective | None = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """The pure train step; gradients accumulate over ``grad_accum_steps``.

  The objective is the token-weighted mean cross-entropy over the *whole*
  batch, plus the mean of the sown auxiliary losses, plus (with
  ``model.mtp.depth = K > 0``) ``loss_weight / K * sum_k`` of each MTP
  depth's weighted mean cross-entropy, so accumulation gives the same update
  as one big batch. The ``loss`` metric is the main next-token CE alone;
  ``mtp_loss_k`` are logged per depth. An ``extra_objective`` scales the CE
  by its ``ce_weight`` and adds its term (``train_step(state, batch, extra)``).
  """
  mtp = model.cfg.mtp
  ce_weight = 1.0 if extra_objective is None else extra_objective.ce_weight
  capture = extra_objective is not None and extra_objective.capture_experts

  def train_step(state: TrainState, batch: Batch, extra=None):
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
    _, mtp_w_BxKxT = mtp_targets(batch["targets"], batch["weights"], batch["segment_ids"], mtp.depth)
    mtp_total_weight_K = jnp.maximum(jnp.sum(mtp_w_BxKxT, axis=(0, 2)), 1.0)

    def micro_loss(params, micro: Batch):
      out = _forward(model, params, state.model_state, micro, loss_chunk, capture)
      ce_sum = jnp.sum(out.ce_BxT * micro["weights"].astype(jnp.float32))
      mtp_sum_K = jnp.sum(out.mtp_ce_BxKxT * out.mtp_weights_BxKxT, axis=(0, 2))
      mtp_term = mtp.loss_weight / max(mtp.depth, 1) * jnp.sum(mtp_sum_K / mtp_total_weight_K)
      extra_term, extra_sums = (jnp.zeros((), jnp.float32), {}) if extra_objective is None else (
          extra_objective.term(extra, micro, out, total_weight))
      objective = ce_weight * ce_sum / total_weight + out.aux_loss / grad_accum_steps + mtp_term + extra_term
      return objective, ((ce_sum, mtp_sum_K, out.aux_loss, out.stats, out.metrics, extra_sums), out.max_logits)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    micros = _split_micro(batch, grad_accum_steps)
    first_micro = jax.tree.map(lambda x: x[0], micros)

    def accumulate(carry, micro: Batch):
      grads, sums, maxima = carry
      (_, (micro_sums, micro_maxima)), micro_grads = grad_fn(state.params, micro)
      return (jax.tree.map(jnp.add, grads, micro_grads), jax.tree.map(jnp.add, sums, micro_sums),
              jax.tree.map(jnp.maximum, maxima, micro_maxima)), None

    shapes = jax.eval_shape(grad_fn, state.params, first_micro)
    (sum_shapes, max_shapes), grad_shapes = shapes[0][1], shapes[1]
    init = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grad_shapes, sum_shapes))
            + (jax.tree.map(lambda s: jnp.full(s.shape, -jnp.inf, s.dtype), max_shapes),))
    (grads, (ce_sum, mtp_sum_K, aux_sum, stats, layer_metrics, extra_sums), max_logits), _ = jax.lax.scan(
        accumulate, init, micros)

    def objective(params):
      """~The first micro-batch's mean objective (Sophia's Hessian-vector products)."""
      return grad_accum_steps * micro_loss(params, first_micro)[0]

    updates, opt_state = tx.update(grads, state.opt_state, state.params, max_logits=max_logits, obj_fn=objective)
    params = optax.apply_updates(state.params, updates)
    model_state = update_model_state(state.model_state, stats, model.cfg, state.step)
    ce = ce_sum / total_weight
    aux = aux_sum / grad_accum_steps
    mtp_loss_K = mtp_sum_K / mtp_total_weight_K
    extra_metrics = {} if extra_objective is None else extra_objective.metrics(extra_sums, total_weight)
    total = (ce_weight * ce + aux + mtp.loss_weight / max(mtp.depth, 1) * jnp.sum(mtp_loss_K)
             + extra_metrics.get("extra_loss", 0.0))
    grad_norm = optax.tree.norm(grads)

    # A NaN/Inf loss or gradient leaves the state exactly as it was (the
    # trainer's config.train.nonfinite policy decides what happens next).
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    params, opt_state, model_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state, model_state), (state.params, state.opt_state, state.model_state))
    nonfinite_steps = state.nonfinite_steps + (~finite).astype(jnp.int32)

    metrics = {"loss": ce, "aux_loss": aux, "total_loss": total, "grad_norm": grad_norm,
               "param_norm": optax.tree.norm(params), "learning_rate": schedule(state.step),
               "tokens": total_weight, "finite": finite, "nonfinite_steps": nonfinite_steps,
               **{f"mtp_loss_{k + 1}": mtp_loss_K[k] for k in range(mtp.depth)}, **extra_metrics,
               **{k: v / grad_accum_steps for k, v in layer_metrics.items()},
               **_per_layer_rms(updates), **optimizer_metrics(opt_state),
               **{f"{module}/max_logit": jnp.max(m_H) for module, m_H in max_logits.items()}}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state, nonfinite_steps=nonfinite_steps)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, loss_chunk: int) -> Callable[[TrainState, Batch], dict]:
  """Sums of weighted loss, weight and correct argmax predictions on a batch,
  and per MTP depth (``[K]`` arrays) of weighted loss and weight."""

  def eval_step(params, model_state, batch: Batch):
    out = _forward(model, params, model_state, batch, loss_chunk)
    w_BxT = batch["weights"].astype(jnp.float32)
    return {"loss_sum": jnp.sum(out.ce_BxT * w_BxT), "weight_sum": jnp.sum(w_BxT),
            "correct_sum": jnp.sum(out.correct_BxT * w_BxT),
            "mtp_loss_sum": jnp.sum(out.mtp_ce_BxKxT * out.mtp_weights_BxKxT, axis=(0, 2)),
            "mtp_weight_sum": jnp.sum(out.mtp_weights_BxKxT, axis=(0, 2))}

  return eval_step


def _shaped_boxes(opt_state):
  """Optimizer states built by mapping over boxed parameters carry the
  parameter's axis names (so they shard like it); a state of another rank
  (Adafactor's factored moments) drops them and is replicated."""
  def fit(x):
    mismatched = (isinstance(x, nn.LogicallyPartitioned) and hasattr(x.value, "ndim")
                  and x.value.ndim != len(x.names))
    return x.value if mismatched else x

  return jax.tree.map(fit, opt_state, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


class Experiment:
  """The model, optimizer, mesh and jitted steps for one config.

  Built once; :func:`train` and :func:`evaluate` (and notebooks) use it.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, devices=None, extra_objective: ExtraObjective | None = None):
    devices = list(jax.devices() if devices is None else devices)
    config_lib.validate(cfg, num_devices=len(devices))
    self.cfg = cfg
    self.mesh = make_mesh(cfg.mesh, devices)
    self.model = build_model(cfg.model)
    boxed_params = jax.eval_shape(self._boxed_variables, jax.random.key(0))[0]
    self.layout = ParamLayout(nn.get_partition_spec(boxed_params),
                              jax.tree.map(lambda s: s.spec, logical_sharding(self.mesh, boxed_params)))
    self.tx, self.schedule = build_optimizer(cfg.optim, cfg.train.steps, self.layout)

    boxed = jax.eval_shape(self._boxed_init, jax.random.key(0))
    self.state_shardings = logical_sharding(self.mesh, boxed)
    self.abstract_state = abstract_like(nn.meta.unbox(boxed), self.state_shardings)

    batch_shard = batch_sharding(self.mesh)
    # ``extra`` (the objective's frozen inputs, e.g. teacher parameters) keeps the sharding it was put in.
    self.extra = None
    self._train_step = jax.jit(
        make_train_step(self.model, self.tx, self.schedule, cfg.train.grad_accum_steps, cfg.train.loss_chunk,
                        extra_objective),
        in_shardings=(self.state_shardings, batch_shard, None),
        out_shardings=(self.state_shardings, None), donate_argnums=0,
        compiler_options=remat_compiler_options(devices[0].platform))
    eval_shardings = (self.state_shardings.params, self.state_shardings.model_state, batch_shard)
    self._eval_step = jax.jit(make_eval_step(self.model, cfg.train.loss_chunk), in_shardings=eval_shardings)
    self._token_stats = jax.jit(
        lambda params, model_state, batch: _forward(self.model, params, model_state, batch, cfg.train.loss_chunk)[:2],
        in_shardings=eval_shardings)

  def _boxed_variables(self, rng):
    """(params, other variable collections), logically boxed."""
    dummy = jnp.zeros((1, self.cfg.data.seq_len), jnp.int32)
    variables = {k: v for k, v in self.model.init(rng, dummy).items() if k not in SOWN}
    return variables.pop("params"), variables

  def _boxed_init(self, rng) -> TrainState:
    params, variables = self._boxed_variables(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=_shaped_boxes(self.tx.init(params)),
                      model_state=variables, nonfinite_steps=jnp.zeros((), jnp.int32))

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
      return self._train_step(state, put_batch(batch, self.mesh), self.extra)

  def eval_sums(self, state: TrainState, batches) -> dict[str, np.ndarray]:
    """Sums over ``batches`` (host numpy dicts) of the :func:`make_eval_step` sums."""
    totals = None
    with self._context():
      for batch in batches:
        sums = jax.device_get(self._eval_step(state.params, state.model_state, put_batch(batch, self.mesh)))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return totals

  def token_stats(self, state: TrainState, batch) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (cross-entropy, argmax correct), float32 [B, T], for a host batch."""
    with self._context():
      out = self._token_stats(state.params, state.model_state, put_batch(batch, self.mesh))
    return tuple(np.asarray(jax.device_get(x)) for x in out)

  def data_iterator(self, split: str) -> ShardedBatches:
    """This process's rows of every global batch (see ``ShardedBatches``).

    Data problems (no files, bad text, ...) raise ConfigError here, before
    anything is compiled or written.
    """
    try:
      return ShardedBatches(self.cfg.data, split=split, global_batch=self.cfg.train.batch_size,
                            seed=self.cfg.seed, num_shards=self.cfg.data.shards,
                            process_index=jax.process_index(), process_count=jax.process_count())
    except (ValueError, OSError, UnicodeError) as err:
      raise config_lib.ConfigError(f"data ({split} split): {err}") from err

  def evaluate(self, state: TrainState, num_batches: int) -> dict[str, float]:
    """Validation loss, perplexity and token accuracy on the first batches
    (and ``eval_mtp_loss_k`` per MTP depth)."""
    it = self.data_iterator("validation")
    sums = self.eval_sums(state, (next(it) for _ in range(num_batches)))
    weight = max(float(sums["weight_sum"]), 1.0)
    loss = float(sums["loss_sum"]) / weight
    mtp_loss_K = sums["mtp_loss_sum"] / np.maximum(sums["mtp_weight_sum"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss)),
            "eval_accuracy": float(sums["correct_sum"]) / weight, "eval_tokens": float(sums["weight_sum"]),
            **{f"eval_mtp_loss_{k + 1}": float(v) for k, v in enumerate(mtp_loss_K)}}


class ExpertCollapseWatch:
  """Warns when an MoE expert receives almost no tokens for many steps in a row.

  Reads the per-layer ``.../expert_load`` metrics (assignments per expert /
  mean, see ``moejax/layers/moe.py``); an expert below ``THRESHOLD`` for
  ``patience`` consecutive steps is reported once (again if it recovers and
  collapses anew). ``patience`` is ``model.moe.collapse_steps`` (0: never).
  """

  THRESHOLD = 0.01

  def __init__(self, patience: int):
    self.patience = patience
    self.streaks: dict[str, np.ndarray] = {}

  def update(self, step: int, metrics: dict) -> list[str]:
    """Counts this step's loads; logs and returns the new warnings."""
    loads = {k: v for k, v in metrics.items() if k.endswith("/" + EXPERT_LOAD_METRIC)} if self.patience else {}
    warnings = []
    for name, load in jax.device_get(loads).items():
      streak = np.where(np.asarray(load) < self.THRESHOLD, self.streaks.get(name, 0) + 1, 0)
      self.streaks[name] = streak
      for expert in np.flatnonzero(streak == self.patience):
        warnings.append(
            f"step {step}: {name.rsplit('/', 1)[0]} expert {expert} has received under {self.THRESHOLD:.0%} of the "
            f"mean load for {self.patience} steps in a row (collapsed). Balance the router: "
            "model.moe.score_bias=True (aux-loss-free bias) or a larger bias_update_rate / load_balance_weight.")
    for message in warnings:
      log.warning(message)
    return warnings


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf values and the config's policy says stop."""


# Fault injection for the reliability tests: steps whose batch gets NaN weights.
INJECT_NAN_ENV = "MOEJAX_INJECT_NAN_STEPS"


def _injected_nan_steps() -> frozenset[int]:
  return frozenset(int(s) for s in os.environ.get(INJECT_NAN_ENV, "").split(",") if s.strip())


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


def train(cfg: ml_collections.ConfigDict, workdir: str, devices=None, experiment: Experiment | None = None
          ) -> TrainState:
  """Trains ``cfg`` in ``workdir``, resuming from its newest good checkpoint.

  Leaves ``config.json``, ``metrics.jsonl``, ``tensorboard/`` and
  ``checkpoints/`` in ``workdir``. Returns the final state (or the state at
  which a SIGTERM/SIGINT stopped the run, after checkpointing it).
  ``experiment`` (built from ``cfg``) replaces the default :class:`Experiment`,
  e.g. a distillation experiment with its own objective and data.
  """
  exp = experiment or Experiment(cfg, devices)
  t = cfg.train
  data = exp.data_iterator("train")
  if t.eval_every:
    exp.data_iterator("validation")  # fail now, not at the first eval, if that split is unusable
  check_workdir(cfg, workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoint)
  start, state = ckpt.restore_latest(exp.abstract_state, data)
  if state is None:
    start, state = 0, exp.init_state()
  primary = jax.process_index() == 0
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
  writer = MetricsWriter(workdir, start, t.steps, t.batch_size * cfg.data.seq_len) if primary else None
  nan_steps = _injected_nan_steps()
  bad_in_a_row = 0
  collapse_watch = ExpertCollapseWatch(cfg.model.moe.collapse_steps)

  try:
    with StopRequests(ckpt) as stop:
      for step in range(start + 1, t.steps + 1):
        batch = next(data)
        if step in nan_steps:
          batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
        state, metrics = exp.train_step(state, batch)
        bad_in_a_row = 0 if bool(metrics["finite"]) else bad_in_a_row + 1
        if bad_in_a_row:
          state, bad_in_a_row = _handle_nonfinite(exp, ckpt, state, step, metrics, bad_in_a_row)
        collapse_watch.update(step, metrics)
        evaluating = t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps)
        eval_metrics = exp.evaluate(state, t.eval_batches) if evaluating else {}
        if writer and (step % t.log_every == 0 or step == t.steps or evaluating):
          writer.write(step, {**jax.device_get(metrics), **eval_metrics})
        stopping = stop.should_stop(step)
        if step % t.checkpoint_every == 0 or step == t.steps or stopping:
          ckpt.save(step, state, data)
        if stopping:
          log.warning("stopped at step %d with a checkpoint; run the same command again to resume", step)
          break
  finally:
    ckpt.wait()
    ckpt.close()
    if writer:
      writer.close()
  return state


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
  exp = Experiment(cfg, devices)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  step, state = ckpt.restore_latest(exp.abstract_state)
  ckpt.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first with "
                            f"`moejax train --workdir {workdir} ...`.")
  return exp, step, state


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, float]:
  """Validation metrics of the latest checkpoint in ``workdir``."""
  exp, step, state = load_checkpoint(cfg, workdir, devices)
  return {"step": step, **exp.evaluate(state, cfg.train.eval_batches)}
