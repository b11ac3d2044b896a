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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.config import MESH_AXES, ConfigError, mesh_shape

# The mesh axes that split the batch (outside MoE layers the expert axis is one
# more data axis); context parallelism and MoE dispatch use the same tuple.
BATCH_AXES = ("data", "fsdp", "expert")
# The mesh axes that split the routed experts (expert parallelism): the fsdp axis
# as well as the expert axis, so a device holds whole experts (E / (fsdp * expert)
# of them) instead of a d_model slice of every expert, which the MoE layer would
# gather whole (256 x 4096 x 2048 x 3 bf16 = 12.9 GB a layer in DeepSeek-V4-Flash).
# See :func:`expert_axes` for the axes actually used when they do not divide E.
EXPERT_AXES = ("fsdp", "expert")

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
    ("expert", EXPERT_AXES),  # before "embed": an expert's d_model is then whole (embed -> fsdp is taken)
    ("layers", None),        # stacked axis of scanned layers (model.scan_layers): not split; the others are
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("lora", "fsdp"),        # low-rank widths (MLA / V4 q, kv and output ranks): fsdp where no embed axis took it
                             # (w_q_b [lora, heads, head_dim] would otherwise be whole on every device without tensor)
    ("index_heads", None),   # lightning-indexer heads (few, narrow)
    ("o_groups", "tensor"),  # V4 grouped output projection: groups of heads
    ("mlp", "tensor"),
    ("norm", None),
)


# Mesh axes from the least to the most communication-intensive: the order in which
# ``mesh_utils.create_device_mesh`` wants them, so tensor (an all-reduce per layer) and
# expert (all-to-all) get the innermost, best-connected physical axes and data the outermost.
NETWORK_ORDER = ("data", "fsdp", "context", "expert", "tensor")


def dcn_shape(mesh_cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Slices (TPU) or nodes (GPU) along each mesh axis: ``mesh.dcn_<axis>``, 1 when unset."""
  return {a: int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES}


def validate_mesh_dcn(e: list[str], mesh_cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Appends to ``e`` what is wrong with the ``mesh.dcn_*`` fields (config.validate calls this)."""
  dcn = dcn_shape(mesh_cfg)
  for a, v in dcn.items():
    if v < 1:
      e.append(f"mesh.dcn_{a}={v} must be >= 1 (the number of slices or nodes along mesh.{a}; 1: none).")
  if any(v < 1 for v in dcn.values()) or num_devices is None:
    return
  granules = math.prod(dcn.values())
  if num_devices % granules:
    e.append(f"mesh.dcn_* multiply to {granules} slices/nodes, which does not divide the {num_devices} devices; "
             "make their product the number of slices (TPU) or hosts (GPU).")
    return
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
    return  # config.validate reports those
  shape = mesh_shape(mesh_cfg, num_devices)
  for a in MESH_AXES:
    if shape[a] % dcn[a]:
      e.append(f"mesh.dcn_{a}={dcn[a]} does not divide mesh.{a}={shape[a]}: mesh.{a} is the whole axis, "
               f"dcn_{a} the slices along it (each slice holds mesh.{a} / dcn_{a}); change one of them.")


def device_array(devices: Sequence, shape: dict[str, int], dcn: dict[str, int] | None = None) -> np.ndarray:
  """Devices laid out as an array of ``shape`` (axes in MESH_AXES order), following the hardware.

  Without DCN axes (every ``dcn`` entry 1) this is ``mesh_utils.create_device_mesh``,
  which maps the logical axes onto the TPU torus (ring orders, contiguous sub-cubes) and
  orders GPUs by their global id; on CPU it is a plain reshape. With DCN axes it is
  ``mesh_utils.create_hybrid_device_mesh``: each slice (devices sharing ``slice_index``,
  or ``process_index`` where the platform has no slices, i.e. one GPU node per process)
  holds a ``shape / dcn`` ICI mesh and the slices tile the ``dcn`` mesh, so along each
  axis the slice index changes slowest. Both are built in ``NETWORK_ORDER`` and
  transposed back to ``MESH_AXES``.
  """
  from jax.experimental import mesh_utils

  dcn = dcn or {a: 1 for a in MESH_AXES}
  ici = [shape[a] // dcn[a] for a in NETWORK_ORDER]
  outer = [dcn[a] for a in NETWORK_ORDER]
  devices = list(devices)

  slices = len({getattr(d, "slice_index", 0) for d in devices})
  processes = len({getattr(d, "process_index", 0) for d in devices})
  if math.prod(outer) > 1 and math.prod(outer) not in (slices, processes):
    raise ConfigError(f"mesh.dcn_* = {dcn} asks for {math.prod(outer)} slices/nodes, but the {len(devices)} devices "
                      f"span {slices} slice(s) and {processes} process(es); make the product of mesh.dcn_* equal "
                      "one of them, or set every mesh.dcn_* to 1.")

  def build(split: bool) -> np.ndarray:
    if math.prod(outer) == 1:
      return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=split)
    return mesh_utils.create_hybrid_device_mesh(ici, outer, devices, process_is_granule=slices != math.prod(outer),
                                                allow_split_physical_axes=split)

  try:
    array = build(split=False)
  except (ValueError, NotImplementedError):  # e.g. a logical axis that must split a physical TPU axis
    array = build(split=True)
  return array.transpose([NETWORK_ORDER.index(a) for a in MESH_AXES])


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor, expert, context) over ``devices`` (see :func:`device_array`)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_array(devices, mesh_shape(mesh_cfg, len(devices)), dcn_shape(mesh_cfg)), MESH_AXES)


def divisible_axes(size: int, axes: tuple[str, ...], mesh_shape) -> tuple[str, ...]:
  """``axes`` less leading axes until the product of their sizes divides ``size`` (possibly ())."""
  while axes and size % math.prod(mesh_shape.get(a, 1) for a in axes):
    axes = axes[1:]
  return axes


def expert_axes(mesh_shape, num_experts: int) -> tuple[str, ...]:
  """The mesh axes (size > 1) that split ``num_experts`` routed experts, as :func:`logical_sharding` places
  them: :data:`EXPERT_AXES`, less leading axes until they divide ``num_experts`` (e.g. 8 experts on
  fsdp=16, expert=2: only ``expert``). () means every device holds every expert."""
  return tuple(a for a in divisible_axes(num_experts, EXPERT_AXES, mesh_shape) if mesh_shape.get(a, 1) > 1)


def logical_sharding(mesh: Mesh, boxed_tree):
  """NamedShardings for a tree of (possibly) logically partitioned leaves.

  Leaves without logical metadata (step counters, scalars) are replicated. A
  dimension whose size the mesh axes do not divide (e.g. 2 kv heads on
  ``tensor=4``) is replicated along those axes instead of failing; a dimension
  mapped to several axes (experts: :data:`EXPERT_AXES`) first drops leading
  axes until the rest divide it (:func:`divisible_axes`).
  """
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), LOGICAL_RULES)
  leaves = nn.meta.unbox(boxed_tree)

  def fit(spec: P, leaf) -> NamedSharding:
    if not hasattr(leaf, "shape"):  # an empty node read as a leaf (optax's MaskedNode): no arrays
      return leaf
    dims = []
    for size, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
      if isinstance(axes, tuple):
        axes = divisible_axes(size, axes, dict(mesh.shape)) or None
      ways = mesh.shape[axes] if isinstance(axes, str) else math.prod(mesh.shape[a] for a in axes or ())
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
