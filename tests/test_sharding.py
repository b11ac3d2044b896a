"""moejax/sharding.py meshes: shapes, axis orders, hybrid (DCN x ICI) layouts, mesh.dcn_* validation."""

import dataclasses
import itertools

import numpy as np
import pytest

from moejax.config import MESH_AXES, ConfigError, base_config
from moejax.validation import validate
from moejax.sharding import NETWORK_ORDER, device_array, expert_axes, logical_sharding, make_mesh


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What mesh_utils reads of a device; CPU platform so each slice is laid out by a plain reshape."""
  id: int
  slice_index: int | None = 0
  process_index: int = 0
  platform: str = "cpu"
  device_kind: str = "cpu"


def _mesh_cfg(**axes):
  cfg = base_config()
  cfg.mesh.update(dict(data=1, fsdp=1, tensor=1, expert=1, context=1))
  cfg.mesh.update(axes)
  return cfg


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=4), dict(fsdp=2, tensor=2, expert=2),
                                  dict(data=2, expert=2, context=2), dict(tensor=4, context=-1)])
def test_single_slice_mesh_shape_and_order(devices, axes):
  """Axis names in MESH_AXES order; on CPU the devices are laid out row-major in NETWORK_ORDER."""
  cfg = _mesh_cfg(**axes)
  mesh = make_mesh(cfg.mesh, devices)
  want = {a: (8 // np.prod([v for v in axes.values() if v != -1]) if axes.get(a) == -1 else axes.get(a, 1))
          for a in MESH_AXES}
  assert mesh.axis_names == MESH_AXES
  assert dict(mesh.shape) == want
  net_shape = [want[a] for a in NETWORK_ORDER]
  for index in itertools.product(*(range(want[a]) for a in MESH_AXES)):
    net_index = [index[MESH_AXES.index(a)] for a in NETWORK_ORDER]
    assert mesh.devices[index] == devices[np.ravel_multi_index(net_index, net_shape)]


def _check_hybrid(array, shape, dcn, granule_of, rank_in_granule):
  """Along each axis the granule index changes slowest; inside a granule the ICI mesh is a row-major reshape."""
  ici = {a: shape[a] // dcn[a] for a in MESH_AXES}
  assert array.shape == tuple(shape[a] for a in MESH_AXES)
  for index in itertools.product(*(range(shape[a]) for a in MESH_AXES)):
    pos = dict(zip(MESH_AXES, index))
    outer = [pos[a] // ici[a] for a in NETWORK_ORDER]
    inner = [pos[a] % ici[a] for a in NETWORK_ORDER]
    device = array[index]
    assert granule_of(device) == np.ravel_multi_index(outer, [dcn[a] for a in NETWORK_ORDER])
    assert rank_in_granule(device) == np.ravel_multi_index(inner, [ici[a] for a in NETWORK_ORDER])


@pytest.mark.parametrize("shape,dcn", [
    (dict(data=2, fsdp=4), dict(data=2)),                 # data parallel across 2 slices, fsdp inside
    (dict(fsdp=8), dict(fsdp=2)),                         # fsdp spanning 2 slices
    (dict(data=4, fsdp=2, expert=2), dict(data=2, fsdp=2)),  # 4 slices on a 2 x 2 DCN mesh
])
def test_hybrid_mesh_over_slices(shape, dcn):
  shape = {a: shape.get(a, 1) for a in MESH_AXES}
  dcn = {a: dcn.get(a, 1) for a in MESH_AXES}
  n, slices = int(np.prod(list(shape.values()))), int(np.prod(list(dcn.values())))
  per = n // slices
  # Slices listed in a scrambled order: the mesh must sort them by slice_index.
  fakes = [FakeDevice(id=s * per + r, slice_index=s) for s in (1, 0, 3, 2) if s < slices for r in range(per)]
  array = device_array(fakes, shape, dcn)
  _check_hybrid(array, shape, dcn, lambda d: d.slice_index, lambda d: d.id % per)


def test_hybrid_mesh_over_processes_when_devices_have_no_slices():
  """GPU nodes: no slice_index, one process per node -> processes are the DCN granules."""
  shape = {a: 1 for a in MESH_AXES} | dict(data=4, tensor=8)
  dcn = {a: 1 for a in MESH_AXES} | dict(data=4)
  fakes = [FakeDevice(id=p * 8 + r, slice_index=None, process_index=p) for p in range(4) for r in range(8)]
  array = device_array(fakes, shape, dcn)
  _check_hybrid(array, shape, dcn, lambda d: d.process_index, lambda d: d.id % 8)


def test_dcn_count_must_match_slices_or_processes():
  fakes = [FakeDevice(id=i, slice_index=i // 4) for i in range(8)]
  shape = {a: 1 for a in MESH_AXES} | dict(data=8)
  with pytest.raises(ConfigError, match=r"asks for 4 slices/nodes.*span 2 slice\(s\) and 1 process"):
    device_array(fakes, shape, {a: 1 for a in MESH_AXES} | dict(data=4))


def test_make_mesh_with_dcn_on_one_host_is_a_clear_error(devices):
  cfg = _mesh_cfg(data=2, fsdp=4)
  cfg.mesh.dcn_data = 2
  with pytest.raises(ConfigError, match="mesh.dcn_"):
    make_mesh(cfg.mesh, devices)


@pytest.mark.parametrize("mesh,dcn,message", [
    (dict(data=2, fsdp=4), dict(dcn_fsdp=0), "mesh.dcn_fsdp=0 must be >= 1"),
    (dict(data=2, fsdp=4), dict(dcn_data=3), "multiply to 3 slices/nodes, which does not divide the 8 devices"),
    (dict(data=2, fsdp=4), dict(dcn_data=4), "mesh.dcn_data=4 does not divide mesh.data=2"),
    (dict(data=-1, tensor=2), dict(dcn_tensor=4), "mesh.dcn_tensor=4 does not divide mesh.tensor=2"),
])
def test_dcn_validation_names_the_field(mesh, dcn, message):
  cfg = _mesh_cfg(**mesh)
  cfg.mesh.update(dcn)
  with pytest.raises(ConfigError, match=message):
    validate(cfg, num_devices=8)


def test_dcn_validation_accepts_a_valid_hybrid_mesh():
  cfg = _mesh_cfg(data=-1, fsdp=4)
  cfg.mesh.update(dcn_data=2, dcn_fsdp=2)
  cfg.train.batch_size = 32
  validate(cfg, num_devices=32)


@pytest.mark.parametrize("axes,num_experts,want", [
    (dict(fsdp=4, expert=2), 8, ("fsdp", "expert")),  # whole experts, E / 8 per device; d_model whole
    (dict(fsdp=8), 16, ("fsdp",)),
    (dict(fsdp=4, expert=2), 6, ("expert",)),          # fsdp * expert does not divide E: the expert axis alone
    (dict(data=8), 8, ()),
])
def test_experts_split_over_fsdp_and_expert(devices, axes, num_experts, want):
  """logical_sharding and the MoE dispatch (expert_axes) agree on the mesh axes that split the experts;
  low-rank weights without an embed axis (V4's w_q_b, w_o_a) are split over fsdp, the others keep fsdp on embed."""
  import flax.linen as nn
  import jax

  mesh = make_mesh(_mesh_cfg(**axes).mesh, devices)
  box = lambda shape, names: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, np.float32), names)
  tree = {"w_gate": box((num_experts, 16, 8), ("expert", "embed", "mlp")),
          "w_q_b": box((16, 4, 8), ("lora", "heads", "head_dim")),
          "w_o_b": box((2, 16, 32), ("o_groups", "lora", "embed"))}
  specs = {k: v.spec for k, v in logical_sharding(mesh, tree).items()}
  assert expert_axes(dict(mesh.shape), num_experts) == want
  entry = specs["w_gate"][0]
  assert tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if mesh.shape[a] > 1) == want
  assert specs["w_gate"][1] is None or "fsdp" not in want  # an expert's d_model stays whole when fsdp splits experts
  fsdp = "fsdp" if mesh.shape["fsdp"] > 1 else None
  assert specs["w_q_b"][0] in (fsdp, "fsdp") and specs["w_o_b"][1] is None and specs["w_o_b"][2] == "fsdp"
