"""Muon on sharded parameters: the update equals the single-device one, and
expert stacks sharded on ``expert`` are orthogonalized without collectives."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.mlp import MLP
from moejax.optim import scale_by_muon
from moejax.train import Experiment
from tests.test_train import small_train_cfg

NUM_EXPERTS = 8


class _Router(nn.Module):
  @nn.compact
  def __call__(self, x_BxTxD):
    w = self.param("w_gate", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
                   (x_BxTxD.shape[-1], NUM_EXPERTS))
    return jax.nn.softmax(jnp.einsum("BTD,DE->BTE", x_BxTxD, w), axis=-1)


@MLP.register("soft_experts_for_tests")
class SoftExperts(nn.Module):
  """A dense mixture of SwiGLU experts with MoE-style stacked weights [E, D, F]."""

  cfg: object

  @nn.compact
  def __call__(self, x_BxTxD, token_ids_BxT=None):
    d, f = x_BxTxD.shape[-1], self.cfg.ffn_dim // 2
    init = nn.initializers.normal(0.02)
    w_gate = self.param("w_gate", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")), (NUM_EXPERTS, d, f))
    w_up = self.param("w_up", nn.with_logical_partitioning(init, ("expert", "embed", "mlp")), (NUM_EXPERTS, d, f))
    w_down = self.param("w_down", nn.with_logical_partitioning(init, ("expert", "mlp", "embed")), (NUM_EXPERTS, f, d))
    probs_BxTxE = _Router(name="router")(x_BxTxD)
    h_BxTxExF = nn.silu(jnp.einsum("BTD,EDF->BTEF", x_BxTxD, w_gate)) * jnp.einsum("BTD,EDF->BTEF", x_BxTxD, w_up)
    return jnp.einsum("BTEF,EFD,BTE->BTD", h_BxTxExF, w_down, probs_BxTxE)


def _muon_cfg():
  cfg = small_train_cfg()
  cfg.model.update(num_layers=1, mlp_types=("soft_experts_for_tests",), d_model=32, ffn_dim=64)
  cfg.data.update(seq_len=32, task_length=16)
  cfg.optim.update(name="muon", learning_rate=1e-2)
  cfg.optim.muon.ns_dtype = "float32"
  cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=1)
  return cfg


def _params_after(cfg, devices, steps=2):
  exp = Experiment(cfg, devices)
  state, data = exp.init_state(), exp.data_iterator("train")
  for _ in range(steps):
    state, metrics = exp.train_step(state, next(data))
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.fixture(scope="module")
def single_device_result(devices):
  return _params_after(_muon_cfg(), devices[:1])


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", [dict(fsdp=2, tensor=2, expert=2)])  # every axis Muon shards over
def test_sharded_muon_equals_single_device(devices, single_device_result, mesh):
  cfg = _muon_cfg()
  cfg.mesh.update(mesh)
  params, metrics = _params_after(cfg, devices)
  chex.assert_trees_all_close(params, single_device_result[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["layer_0/ns_error"], single_device_result[1]["layer_0/ns_error"], rtol=1e-4)


@pytest.mark.multidevice
def test_sharded_muon_on_scanned_expert_stacks_equals_single_device(devices):
  """Scanned layers stack experts [layers, E, D, F] with E split over fsdp x expert: the split axis is
  flattened first (no data moved, see the collectives test below) and the update is the single-device one."""
  def cfg(mesh):
    c = _muon_cfg()
    c.model.update(num_layers=3, mlp_types=("soft_experts_for_tests",) * 3, scan_layers=True)
    c.mesh.update(mesh)
    return c

  single_params, single_metrics = _params_after(cfg({}), devices[:1])
  params, metrics = _params_after(cfg(dict(fsdp=4, expert=2)), devices)
  chex.assert_trees_all_close(params, single_params, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["scanned/ns_error"], single_metrics["scanned/ns_error"], rtol=1e-4)


COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo: str) -> list[tuple[str, str]]:
  """(op, result type) of every collective in compiled HLO text."""
  ops = "|".join(COLLECTIVES)
  return re.findall(rf"= (.+?) ({ops})(?:-start)?\(", hlo)


def _compiled_expert_update(devices, mesh, diagnostics, layers=1):
  """The compiled Muon update of the expert stacks, laid out as the Experiment lays them (``layers`` > 1:
  scanned, stacked [layers, E, ...])."""
  cfg = _muon_cfg()
  cfg.mesh.update(mesh)
  if layers > 1:
    cfg.model.update(num_layers=layers, mlp_types=("soft_experts_for_tests",) * layers, scan_layers=True)
  exp = Experiment(cfg, devices)
  module = ("scanned", "block_0") if layers > 1 else ("layer_0",)
  pick = lambda tree: {k: v for k, v in _at(tree, module)["mlp"].items() if k != "router"}
  params = pick(exp.abstract_state.params)
  shardings = pick(exp.state_shardings.params)
  tx = scale_by_muon(logical_axes=pick(exp.layout.logical_axes), mesh_axes=pick(exp.layout.mesh_axes),
                     ns_dtype=jnp.float32, diagnostics=diagnostics)
  state = jax.eval_shape(tx.init, params)
  with jax.set_mesh(exp.mesh):
    update = jax.jit(tx.update, in_shardings=(shardings, None, None), out_shardings=(shardings, None))
    return update.lower(params, state, None).compile().as_text()


def _at(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


@pytest.mark.multidevice
def test_expert_stacks_orthogonalize_without_collectives(devices):
  hlo = _compiled_expert_update(devices, dict(expert=8), diagnostics=False)
  assert collectives(hlo) == []
  with_diagnostics = collectives(_compiled_expert_update(devices, dict(expert=8), diagnostics=True))
  # Diagnostics (per-layer ns_error) reduce scalars across experts, nothing else.
  assert with_diagnostics and all(op == "all-reduce" and re.fullmatch(r"\(?f32\[\](, f32\[\])*\)?", ty)
                                  for ty, op in with_diagnostics), with_diagnostics
  # Experts split over fsdp (moejax.sharding.EXPERT_AXES) stay put too, also stacked over scanned layers
  # (the sharded expert axis is flattened first).
  assert collectives(_compiled_expert_update(devices, dict(fsdp=4, expert=2), diagnostics=False)) == []
  assert collectives(_compiled_expert_update(devices, dict(fsdp=8), diagnostics=False, layers=3)) == []
  # The counter does see collectives: matrices sharded on a matrix axis move to an owner device (all-to-all).
  assert {op for _, op in collectives(_compiled_expert_update(devices, dict(tensor=8), diagnostics=False))} == {
      "all-to-all"}
