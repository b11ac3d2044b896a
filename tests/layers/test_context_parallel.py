"""Context parallelism: every attention type sharded over ``context`` equals the single-device layer.

The single-device layers are tested against brute force in test_attention*.py;
here the same layer runs under a mesh with ``context`` > 1 (ring / halo /
all-gather paths of ``context_parallel.py``) and must give the same outputs,
metrics, auxiliary losses and gradients (parameters and inputs).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from moejax.layers.attention import context_parallel as cp
from moejax.sharding import LOGICAL_RULES
from tests.layers.test_attention import SMALL, _init, _layer
from tests.test_train import _run_steps, small_train_cfg

T = 16
# Row 0: one document; row 1: a document crossing the shard boundaries, a second one, then padding.
SEGMENTS = np.array([[1] * T, [1] * 5 + [2] * 7 + [0] * 4], np.int32)
POSITIONS = np.array([list(range(T)), list(range(5)) + list(range(7)) + [0] * 4], np.int32)
# The sharded path sums the same float32 terms in another order (ring steps, merges), and the
# large logits of scale=20 parameters amplify rounding: each leaf must agree to 2e-5 of its
# largest entry, plus 2e-5 relative.
CASES = [("dense", {}), ("sliding", {}), ("mla", {}), ("dsa", {}), ("dsa", {"indexer_stage": "warmup"}),
         ("swa", {}), ("csa", {}), ("hca", {})]


def assert_close(got, want):
  def leaf(g, w):
    w = np.asarray(w)
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(float(np.abs(w).max(initial=0.0)), 1.0))

  chex.assert_trees_all_equal_structs(got, want)
  jax.tree.map(leaf, got, want)


def _mesh(devices, **axes):
  shape = {**dict(data=1, fsdp=1, tensor=1, expert=1, context=1), **axes}
  n = int(np.prod(list(shape.values())))
  return Mesh(np.asarray(devices[:n]).reshape(list(shape.values())), tuple(shape))


def _run(attn, variables, x, mesh=None):
  """(y, aux_loss + metrics leaves, grads of a random projection of y w.r.t. (params, x))."""
  r = np.random.default_rng(3).normal(size=x.shape[:2] + (attn.cfg.d_model,)).astype(np.float32)

  def loss(params, x):
    y, cols = attn.apply({"params": params}, x, POSITIONS, SEGMENTS, mutable=["aux_loss", "metrics"])
    aux = sum(jax.tree.leaves(cols.get("aux_loss", {})), 0.0)
    return jnp.sum(y * r) + aux, (y, cols)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    return fn(variables["params"], x)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    assert cp.context_size(T) == mesh.shape["context"]
    return fn(variables["params"], x)


@pytest.mark.parametrize("attention_type,extra", CASES, ids=[f"{t}-{e.get('indexer_stage', '')}" for t, e in CASES])
def test_context_sharded_equals_single_device(devices, attention_type, extra):
  attn, _ = _layer(attention_type, **{**SMALL, "window": 4, "chunk_size": 4, **extra})
  x = np.random.default_rng(0).normal(size=(2, T, 32)).astype(np.float32)
  variables = _init(attn, x, POSITIONS, SEGMENTS, scale=20.0)
  (want_loss, (want_y, want_cols)), want_grads = _run(attn, variables, x)
  (got_loss, (got_y, got_cols)), got_grads = _run(attn, variables, x, _mesh(devices, context=2, data=2))
  assert_close(got_y, want_y)
  assert_close(got_cols, want_cols)
  assert_close(got_grads, want_grads)
  assert_close(got_loss, want_loss)


def test_ring_with_tensor_sharded_heads_and_eight_shards(devices):
  """Heads split over ``tensor`` inside the ring; 8 shards of 2 tokens (half-chunks of one token)."""
  attn, _ = _layer("dense", **{**SMALL, "chunk_size": 4})
  x = np.random.default_rng(1).normal(size=(2, T, 32)).astype(np.float32)
  variables = _init(attn, x, POSITIONS, SEGMENTS, scale=20.0)
  want = _run(attn, variables, x)
  for mesh in (_mesh(devices, context=4, tensor=2), _mesh(devices, context=8)):
    assert_close(_run(attn, variables, x, mesh), want)


def test_zigzag_layout_round_trips_and_balances_causal_work(devices):
  """Device d holds half-chunks d and 2C-1-d; every device sees the same number of visible (q, k) pairs."""
  c, half = 4, 2
  mesh = _mesh(devices, context=c)
  x = np.arange(2 * c * half, dtype=np.float32)[None]
  spec = jax.sharding.PartitionSpec(None, "context")
  with jax.set_mesh(mesh):
    zig = jax.jit(jax.shard_map(lambda a: cp._to_zigzag(a, c), in_specs=spec, out_specs=spec))(x)
    back = jax.jit(jax.shard_map(lambda a: cp._from_zigzag(cp._to_zigzag(a, c), c), in_specs=spec,
                                 out_specs=spec))(x)
  want = np.concatenate([np.r_[d * half:(d + 1) * half, (2 * c - 1 - d) * half:(2 * c - d) * half]
                         for d in range(c)])
  np.testing.assert_array_equal(np.asarray(zig)[0], want)
  np.testing.assert_array_equal(np.asarray(back), x)
  work = [sum(int(k <= q) for q in want[d * 2 * half:(d + 1) * 2 * half] for k in range(2 * c * half))
          for d in range(c)]
  assert len(set(work)) == 1, work


@pytest.mark.slow
@pytest.mark.multidevice
def test_csa_moe_training_under_context_expert_data_mesh_equals_single_device(devices):
  """A CSA + MoE layer: one step with context=2 x expert=2 x data=2 gives the single-device loss and
  updated parameters (so the gradients agree too). Dense ring training under context=4 is in test_train.py."""
  cfg = small_train_cfg(steps=1)
  cfg.model.update(num_layers=1, attention_types=("csa",), mlp_types=("moe",))
  cfg.model.attention.update(q_lora_rank=16, window=8, csa_ratio=4, index_heads=2, index_head_dim=8, index_topk=4,
                             o_groups=2, o_lora_rank=8, rope_dim=8, chunk_size=8)
  cfg.model.moe.update(num_experts=4, top_k=2, expert_ffn_dim=32, dispatch="capacity", capacity_factor=4.0)
  cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=1)
  single_losses, single_params = _run_steps(cfg, devices[:1], 1)
  cfg.mesh.update(context=2, expert=2, data=2)
  sharded_losses, sharded_params = _run_steps(cfg, devices, 1)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  chex.assert_trees_all_close(sharded_params, single_params, rtol=1e-4, atol=1e-6)
