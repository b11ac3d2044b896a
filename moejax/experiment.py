"""``Experiment``: the model, optimizer, mesh and jitted steps for one config.

Built once from a validated config; :func:`moejax.train.train`, evaluation,
generation, distillation and notebooks all drive the same object.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import config as config_lib
from moejax.checkpoint import abstract_like
from moejax.data import ShardedBatches
from moejax.models import build_model
from moejax.models.block import remat_compiler_options
from moejax.objective import SOWN, ExtraObjective, forward
from moejax.optim import ParamLayout, build_optimizer
from moejax.sharding import LOGICAL_RULES, batch_sharding, logical_sharding, make_mesh, put_batch
from moejax.step import TrainState, make_eval_step, make_train_step
from moejax.validation import validate

# The arrays of one training batch, all [batch, seq_len] (``put_batch`` shards them over the batch axes).
BATCH_KEYS = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32, "segment_ids": jnp.int32,
              "positions": jnp.int32}


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
    validate(cfg, num_devices=len(devices))
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
    self._init = jax.jit(lambda rng: nn.meta.unbox(self._boxed_init(rng)), out_shardings=self.state_shardings)

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
        lambda params, model_state, batch: forward(self.model, params, model_state, batch, cfg.train.loss_chunk)[:2],
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
      return self._init(jax.random.key(self.cfg.seed))

  def lower_train_step(self, batch_size: int | None = None):
    """The train step traced on abstract state and a ``[batch_size, data.seq_len]`` batch (default
    ``train.batch_size``; ``ShapeDtypeStruct``s, nothing is allocated): ``.compile()`` gives the executable
    ahead of time, called as ``compiled(state, put_batch(batch, exp.mesh), exp.extra)``, with its
    ``memory_analysis()`` and ``cost_analysis()`` (``moejax compile``, ``benchmarks/accelerator.py``)."""
    shape = (batch_size or self.cfg.train.batch_size, self.cfg.data.seq_len)
    sharding = batch_sharding(self.mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, dtype in BATCH_KEYS.items()}
    with self._context():
      return self._train_step.lower(self.abstract_state, batch, self.extra)

  def lower_init(self):
    """:meth:`init_state`'s program, traced ahead of time: ``.compile()(jax.random.key(cfg.seed))``."""
    with self._context():
      return self._init.lower(jax.random.key(self.cfg.seed))

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
    mtp_loss_L = sums["mtp_loss_sum"] / np.maximum(sums["mtp_weight_sum"], 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss)),
            "eval_accuracy": float(sums["correct_sum"]) / weight, "eval_tokens": float(sums["weight_sum"]),
            **{f"eval_mtp_loss_{k + 1}": float(v) for k, v in enumerate(mtp_loss_L)}}
