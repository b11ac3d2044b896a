"""model.scan_layers (moejax/models/scan.py) against the unrolled model: the same parameters, stacked."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from moejax.config import ConfigError, load_config
from moejax.generate import sample
from moejax.interop import hf
from moejax.models import build_model
from moejax.models.scan import (ScanPlan, plan_of, scan_plan, stack, stack_collections, unrolled, unstack,
                                unstack_collections)
from moejax.step import TrainState
from moejax.validation import validate


def _cfg(spec: str, **model):
  cfg = load_config(spec)
  cfg.model.update(model)
  cfg.model.scan_layers = True
  return cfg


def _tokens(cfg, shape=(2, 64), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.model.vocab_size, shape), jnp.int32)


def test_plan_scans_the_longest_repeated_run():
  flash = load_config("configs/v4_flash.py").model  # swa, swa, csa(hash), then csa/hca pairs
  assert scan_plan(flash) == ScanPlan(prefix=3, period=2, repeats=20, num_layers=43)
  tiny = load_config("configs/tiny.py").model
  assert scan_plan(tiny) == ScanPlan(0, 1, 4, 4)
  tiny.update(attention_types=("dense", "sliding", "dense", "sliding", "dense"), num_layers=5)
  assert scan_plan(tiny) == ScanPlan(0, 2, 2, 5)  # 4 layers scanned, the last unrolled
  tiny.update(attention_types=("dense", "sliding", "mla", "dense"), num_layers=4)
  assert scan_plan(tiny) is None


def test_a_schedule_that_does_not_repeat_is_refused_before_compiling():
  cfg = _cfg("configs/tiny.py", num_layers=3, attention_types=("dense", "sliding", "mla"))
  with pytest.raises(ConfigError, match="model.scan_layers=True but no run of layers repeats"):
    validate(cfg, 1)
  cfg = _cfg("configs/tiny.py")
  cfg.model.attention.track_max_logit = True
  cfg.optim.qk_clip_tau = 50.0
  with pytest.raises(ConfigError, match="optim.qk_clip_tau > 0 with model.scan_layers=True"):
    validate(cfg, 1)


def test_stack_and_unstack_are_inverse():
  plan = ScanPlan(1, 2, 2, 6)
  tree = {f"layer_{i}": {"w": jnp.full((3,), float(i))} for i in range(6)} | {"embed": jnp.ones(2)}
  stacked = stack(tree, plan)
  assert sorted(stacked) == ["embed", "layer_0", "layer_5", "scanned"]
  np.testing.assert_array_equal(stacked["scanned"]["block_1"]["w"][:, 0], [2.0, 4.0])  # layers 2 and 4
  chex.assert_trees_all_equal(unstack(stacked, plan), tree)


@pytest.mark.parametrize("spec,model", [
    ("configs/tiny_hybrid.py:v4", {}),                        # swa prefix, (csa, hca) scanned, mHC, hash + moe
    ("configs/tiny_mhc_mtp.py", {"remat": ("full",)}),       # remat inside the scan, MTP after it
    ("configs/tiny_hybrid.py:dsa", {}),                      # indexer (sows its KL loss)
])
def test_logits_and_gradients_equal_the_unrolled_model(spec, model):
  cfg = _cfg(spec, **model)
  plan = plan_of(cfg.model)
  assert plan is not None
  scanned, flat = build_model(cfg.model), build_model(unrolled(cfg.model))
  x = _tokens(cfg)
  variables = nn.meta.unbox(jax.jit(flat.init)(jax.random.key(0), x))
  state = {k: v for k, v in variables.items() if k not in ("params", "aux_loss", "metrics", "stats")}
  params = variables["params"]

  def loss(model, params, state):
    hidden, sown = model.apply({"params": params, **state}, x, return_hidden=True, mutable=["aux_loss"])
    aux = sum(jnp.sum(a) for a in jax.tree.leaves(sown))
    return jnp.mean(jnp.square(hidden.x_BxTxD)) + sum(jnp.mean(h) for h in hidden.mtp) + aux

  # Jitted: one compile per function runs this 2.2x faster than op-by-op dispatch of the unrolled model.
  chex.assert_trees_all_close(jax.jit(scanned.apply)(stack_collections(variables, plan), x),
                              jax.jit(flat.apply)(variables, x), atol=2e-5, rtol=2e-5)
  grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
  grads_flat = grad(flat, params, state)
  grads_scanned = grad(scanned, stack(params, plan), stack_collections(state, plan))
  chex.assert_trees_all_close(unstack(grads_scanned, plan), grads_flat, atol=2e-6, rtol=2e-4)


def _state_like(exp, flat_state, plan):
  """``flat_state`` (an unrolled experiment's fresh state) in the scanned layout of ``exp``."""
  flat_state = jax.tree.map(jnp.copy, flat_state)  # nothing shared with the state the unrolled step donates
  params = stack(flat_state.params, plan)
  state = TrainState(step=flat_state.step, params=params, opt_state=exp.tx.init(params),
                     model_state=stack_collections(flat_state.model_state, plan), nonfinite_steps=flat_state.nonfinite_steps)
  return jax.device_put(state, exp.state_shardings)


def _batch(cfg, seed):
  tokens = np.asarray(_tokens(cfg, (4, 65), seed=seed))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((4, 64), np.float32),
          "segment_ids": np.ones((4, 64), np.int32), "positions": np.tile(np.arange(64, dtype=np.int32), (4, 1))}


def _experiments(devices, optimizer: str):
  """(unrolled on one device, scanned on 4 devices) experiments of the MoE model with the balancing bias."""
  from moejax.train import Experiment

  cfg = _cfg("configs/tiny_moe.py:v3")
  cfg.optim.update(name=optimizer, warmup_steps=0)
  cfg.data.seq_len, cfg.train.batch_size = 64, 4
  flat_cfg = cfg.copy_and_resolve_references()
  flat_cfg.model.scan_layers = False
  cfg.mesh.update(data=2, fsdp=2, expert=1, tensor=1, context=1)
  return Experiment(flat_cfg, devices[:1]), Experiment(cfg, devices[:4])


def test_train_steps_equal_the_unrolled_model_sharded(devices):
  """Two SGD steps (the same gradients give the same update) scanned on 4 devices vs unrolled on one:
  parameters, the balancing bias and the per-layer diagnostics agree."""
  flat_exp, exp = _experiments(devices, "sgd")
  plan = plan_of(exp.cfg.model)
  flat_state = flat_exp.init_state()
  state = _state_like(exp, flat_state, plan)
  for step in range(2):
    flat_state, flat_metrics = flat_exp.train_step(flat_state, _batch(exp.cfg, step))
    state, metrics = exp.train_step(state, _batch(exp.cfg, step))
  chex.assert_trees_all_close(unstack(jax.device_get(state.params), plan), jax.device_get(flat_state.params),
                              atol=1e-7, rtol=1e-6)
  bias = unstack_collections(jax.device_get(state.model_state), plan)
  chex.assert_trees_all_close(bias, jax.device_get(flat_state.model_state), atol=1e-7)
  assert jnp.any(flat_state.model_state["router_bias"]["layer_1"]["mlp"]["router"]["bias"] != 0)  # it moved
  per_layer = lambda m: {k: v for k, v in m.items() if k.startswith("layer_")}  # keep their layer_i names
  assert sorted(per_layer(metrics)) == sorted(per_layer(flat_metrics))
  assert "layer_3/update_rms" in metrics and "layer_3/mlp/load_max_over_mean" in metrics
  chex.assert_trees_all_close(per_layer(metrics), per_layer(flat_metrics), atol=1e-6, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], flat_metrics["loss"], rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_optimizer_updates_equal_the_unrolled_models(devices, optimizer):
  """From the same gradients, the stacked layout gets the same update: Muon orthogonalises each scanned
  layer's matrix on its own (``layers`` is a stack axis), weight decay skips stacked norms."""
  flat_exp, exp = _experiments(devices, optimizer)
  plan = plan_of(exp.cfg.model)
  params = jax.device_get(flat_exp.init_state().params)
  grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(p.size).normal(size=p.shape), p.dtype), params)
  update = lambda tx, g, p: tx.update(g, tx.init(p), p)[0]
  flat_updates = jax.jit(functools.partial(update, flat_exp.tx))(grads, params)
  updates = jax.jit(functools.partial(update, exp.tx))(stack(grads, plan), stack(params, plan))
  chex.assert_trees_all_close(unstack(updates, plan), flat_updates, atol=1e-6, rtol=1e-5)


def test_decoding_equals_the_unrolled_model():
  """Greedy decoding through the per-layer caches (stacked under the scan) gives the same tokens."""
  cfg = _cfg("configs/tiny_hybrid.py:v4")
  plan = plan_of(cfg.model)
  scanned, flat = build_model(cfg.model), build_model(unrolled(cfg.model))
  prompts = _tokens(cfg, (2, 16), seed=3)
  variables = {k: v for k, v in nn.meta.unbox(flat.init(jax.random.key(1), prompts)).items()
               if k in ("params", "router_bias", "hash_table")}
  run = lambda model, v: sample(model, v, prompts, jnp.array([16, 11]), rng=jax.random.key(0), max_new_tokens=8,
                                temperature=0.0)
  out_flat, out_scanned = run(flat, variables), run(scanned, stack_collections(variables, plan))
  np.testing.assert_array_equal(out_scanned.tokens_BxN, out_flat.tokens_BxN)
  np.testing.assert_array_equal(out_scanned.lengths_B, out_flat.lengths_B)


def test_hugging_face_tensors_are_the_unrolled_models():
  """Export unstacks, import stacks: the same tensors as the unrolled model's, both ways."""
  cfg = _cfg("configs/tiny_moe.py:v3")
  plan = plan_of(cfg.model)
  scanned, flat = build_model(cfg.model), build_model(unrolled(cfg.model))
  variables = {k: v for k, v in nn.meta.unbox(flat.init(jax.random.key(0), _tokens(cfg))).items()
               if k in hf.COLLECTIONS}
  config_flat, tensors_flat = hf.hf_tensors(flat, variables)
  config_scanned, tensors_scanned = hf.hf_tensors(scanned, stack_collections(variables, plan))
  tensors_flat, tensors_scanned = dict(tensors_flat), dict(tensors_scanned)
  assert config_scanned == config_flat and sorted(tensors_scanned) == sorted(tensors_flat)
  for name, array in tensors_flat.items():
    np.testing.assert_array_equal(tensors_scanned[name], array)

  class Reader:
    names = lambda self: sorted(tensors_flat)
    __call__ = lambda self, name: np.asarray(tensors_flat[name])

  loaded = hf._place(Reader(), scanned, config_flat["model_type"])
  chex.assert_trees_all_equal(loaded, stack_collections(variables, plan))
