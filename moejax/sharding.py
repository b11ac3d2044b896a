"""Device mesh, the logical-axis rules table, and array placement.

Parameters and activations carry logical axis names (see
``moejax/layers/__init__.py``); ``LOGICAL_RULES`` maps each onto mesh axes.
A new parallelism layout is a change of ``config.mesh`` (and, rarely, of this
table), never of layer code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moejax.config import MESH_AXES, mesh_shape

# The mesh axes that split the batch (outside MoE layers the expert axis is one
# more data axis); context parallelism and MoE dispatch use the same tuple.
BATCH_AXES = ("data", "fsdp", "expert")

# Logical name -> mesh axis (or axes). Parameter names shard over fsdp/tensor/
# expert; activation names (act_*) over data/fsdp/expert for the batch,
# context for the sequence and tensor for heads/ffn/vocab.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("act_batch", BATCH_AXES),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("lora", None),          # low-rank widths (MLA / V4 q, kv and output ranks)
    ("index_heads", None),   # lightning-indexer heads (few, narrow)
    ("o_groups", "tensor"),  # V4 grouped output projection: groups of heads
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("norm", None),
)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor, expert, context) over ``devices``."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape([shape[a] for a in MESH_AXES]), MESH_AXES)


def logical_sharding(mesh: Mesh, boxed_tree):
  """NamedShardings for a tree of (possibly) logically partitioned leaves.

  Leaves without logical metadata (step counters, scalars) are replicated. A
  dimension whose size the mesh axes do not divide (e.g. 2 kv heads on
  ``tensor=4``) is replicated along those axes instead of failing.
  """
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), LOGICAL_RULES)
  leaves = nn.meta.unbox(boxed_tree)

  def fit(spec: P, leaf) -> NamedSharding:
    if not hasattr(leaf, "shape"):  # an empty node read as a leaf (optax's MaskedNode): no arrays
      return leaf
    dims = []
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      names = axes if isinstance(axes, tuple) else (axes,)
      ways = math.prod(mesh.shape[a] for a in names if a is not None)
      dims.append(axes if size % ways == 0 else None)
    return NamedSharding(mesh, P(*dims))

  return jax.tree.map(fit, specs, leaves, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, T, ...] arrays: B over (data, fsdp, expert), T over context."""
  return NamedSharding(mesh, P(BATCH_AXES, "context"))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's rows (multi-host safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
