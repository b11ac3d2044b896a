"""Routing record / replay: freeze routing to a recorded run (after Megatron-LM's router replay).

A *record* is, per batch (or training step), each MoE layer's routed experts
``{"layer_1/mlp": int32 [B, T, K]}``. Replaying it runs every router as usual
(parameters, losses, metrics and the gate's gradient through its scores) but
routes each token to its recorded experts, weighted by the router's own scores
at them (``moejax/layers/routers.py:replayable``). Use it to separate router
effects from expert learning: train B with A's routing, compare with B's own.

* eval: ``rec = record_routing(exp, state, batches)``, then
  ``exp.token_stats(state, with_routing(batch, rec[i]))``;
* a run: ``train(cfg, wd, experiment=RecordingExperiment(cfg, "rec"))`` writes
  ``rec/step_000001.npz`` ... (the routing of each step, at the parameters it
  started from); ``train(cfg2, wd2, experiment=ReplayExperiment(cfg2, "rec"))``
  trains with that routing (``cfg2`` must have the same MoE layers, batch and
  sequence shapes).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from moejax.layers.routers import REPLAY_COLLECTION
from moejax.models.scan import plan_of, unstack
from moejax.sharding import put_batch
from moejax.objective import forward, routed_experts
from moejax.train import Experiment

Routing = dict[str, np.ndarray]  # {"layer_1/mlp": int32 [B, T, K]}


def _capture_fn(exp: Experiment):
  if not hasattr(exp, "_capture_routing"):
    loss_chunk = exp.cfg.train.loss_chunk
    exp._capture_routing = jax.jit(
        lambda params, model_state, batch: forward(exp.model, params, model_state, batch, loss_chunk,
                                                    capture_experts=True).experts)
  return exp._capture_routing


def routing_of(exp: Experiment, state, batch) -> Routing:
  """The experts each MoE layer routed each token of ``batch`` to (a replayed batch: the replayed ones)."""
  with exp._context():
    out = _capture_fn(exp)(state.params, state.model_state, put_batch(batch, exp.mesh))
  return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}


def model_routing(model, variables, batch) -> Routing:
  """:func:`routing_of` for a bare model and its variables (e.g. a converted Hugging Face checkpoint)."""
  _, sown = model.apply(variables, np.asarray(batch["inputs"]), capture_intermediates=lambda m, _: m.name == "router",
                        mutable=["intermediates", "metrics", "aux_loss", "stats", "max_stats"])
  captured = unstack(sown["intermediates"], plan_of(model.cfg))  # model.scan_layers: per layer again
  return {k: np.asarray(v) for k, v in routed_experts(captured, batch["inputs"].shape).items()}


def record_routing(exp: Experiment, state, batches) -> list[Routing]:
  """The routing of each batch (an eval record)."""
  return [routing_of(exp, state, batch) for batch in batches]


def with_routing(batch: dict, routing: Routing) -> dict:
  """``batch`` plus the entries that make the model route by ``routing``."""
  return {**batch, **{f"{REPLAY_COLLECTION}/{layer}": np.asarray(e, np.int32) for layer, e in routing.items()}}


def save_routing(path: str, routing: Routing) -> None:
  np.savez_compressed(path, **{k.replace("/", "|"): v for k, v in routing.items()})


def load_routing(path: str) -> Routing:
  with np.load(path) as f:
    return {k.replace("|", "/"): f[k] for k in f.files}


def step_path(record_dir: str, step: int) -> str:
  return os.path.join(record_dir, f"step_{step:06d}.npz")


class RecordingExperiment(Experiment):
  """An :class:`Experiment` that saves each train step's routing to ``record_dir/step_NNNNNN.npz``
  (1-based steps, as in metrics.jsonl) before taking the step."""

  def __init__(self, cfg, record_dir: str, devices=None):
    super().__init__(cfg, devices)
    self.record_dir = record_dir
    os.makedirs(record_dir, exist_ok=True)

  def train_step(self, state, batch):
    save_routing(step_path(self.record_dir, int(state.step) + 1), routing_of(self, state, batch))
    return super().train_step(state, batch)


class ReplayExperiment(Experiment):
  """An :class:`Experiment` whose train steps route by the record in ``record_dir``."""

  def __init__(self, cfg, record_dir: str, devices=None):
    super().__init__(cfg, devices)
    self.record_dir = record_dir

  def train_step(self, state, batch):
    path = step_path(self.record_dir, int(state.step) + 1)
    if not os.path.exists(path):
      raise FileNotFoundError(f"no recorded routing for step {int(state.step) + 1} ({path}); record at least "
                              "train.steps steps with RecordingExperiment.")
    return super().train_step(state, with_routing(batch, load_routing(path)))
