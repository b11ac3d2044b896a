"""moejax/aot.py: collectives read from HLO (CPU), and the TPU ahead-of-time compile (needs libtpu)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moejax import aot
from moejax.config import base_config
from tests.oracle import require


def test_collective_bytes_counts_kinds_and_result_sizes(devices):
  """psum of f32[64, 32] per shard and all_gather of f32[16, 8] per shard over 8 devices."""
  mesh = Mesh(np.asarray(devices), ("x",))

  def f(a, b):
    return jax.lax.psum(a, "x"), jax.lax.all_gather(b, "x", tiled=True)

  fn = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P(), P()),
                                 check_vma=False))
  a = jax.ShapeDtypeStruct((8 * 64, 32), jnp.float32)
  b = jax.ShapeDtypeStruct((8 * 16, 8), jnp.float32)  # XLA:CPU gathers bf16 as f32
  found = aot.collective_bytes(fn.lower(a, b).compile().as_text())
  assert found["all-reduce"] == {"count": 1, "bytes": 64 * 32 * 4}
  assert found["all-gather"] == {"count": 1, "bytes": 8 * 16 * 8 * 4}
  assert set(found) == {"all-reduce", "all-gather"}


def test_collective_bytes_parses_async_and_tuple_results():
  hlo = """
  %ag = (bf16[4,8]{1,0}, bf16[32,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %p), dimensions={0}
  %agd = bf16[32,8]{1,0} all-gather-done((bf16[4,8]{1,0}, bf16[32,8]{1,0}) %ag)
  %ar = (f32[10]{0}, f32[3,3]{1,0}) all-reduce(f32[10]{0} %x, f32[3,3]{1,0} %y), to_apply=%add
  %a2a = s32[2,6]{1,0} all-to-all(s32[2,6]{1,0} %z), dimensions={0}
  """
  found = aot.collective_bytes(hlo)
  assert found == {"all-gather": {"count": 1, "bytes": 32 * 8 * 2},
                   "all-reduce": {"count": 1, "bytes": (10 + 9) * 4},
                   "all-to-all": {"count": 1, "bytes": 12 * 4}}


def test_chip_of_and_capacity_check():
  assert aot.chip_of("v5p:2x2x1") == "v5p" and aot.chip_of("v5litepod-16") == "v5e"
  with pytest.raises(ValueError, match="unknown chip 'v9'"):
    aot.chip_of("v9:2x2")
  report = aot.Report(topology="v5p:2x2x1", chip="v5p", devices=4, mesh={"data": 4}, compile_s=1.0,
                      memory=dict(arguments=0, outputs=0, aliased=0, temporaries=0, code=0, total=96 * aot.GiB),
                      xla_flops=1.0, xla_bytes=1.0, model_flops=1.0, tokens=1, collectives={})
  with pytest.raises(aot.DoesNotFit, match="96.0 GiB per device, more than a v5p chip's 95 GiB"):
    aot.check_fits(report)


def test_roofline_uses_the_model_count_when_xla_counted_a_loop_body_once():
  """A scanned layer stack: XLA's cost analysis counts the body once, so its FLOPs fall below the model's;
  the compute time then comes from the model's FLOPs and MFU stays at most 100%."""
  peak = aot.peak_flops("tpu v5p")
  report = aot.Report(topology="v5p:4x4x4", chip="v5p", devices=64, mesh={"fsdp": 64}, compile_s=1.0,
                      memory=dict(arguments=0, outputs=0, aliased=0, temporaries=0, code=0, total=0),
                      xla_flops=0.2 * peak, xla_bytes=0.0, model_flops=peak, tokens=1, collectives={})
  r = report.roofline()
  assert r["compute_s"] == pytest.approx(1.0) and r["mfu_max"] == pytest.approx(1.0)
  assert report.loops_undercount and "counted each loop body once" in str(report)
  report.xla_flops = 2.0 * peak  # remat and the optimizer on top of the model's FLOPs: XLA's count holds
  assert report.roofline()["compute_s"] == pytest.approx(2.0) and "loop body" not in str(report)


def test_the_tpu_compilers_out_of_memory_refusal_is_a_clear_does_not_fit():
  err = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                     "(1.68T) exceeds available HBM (95.74G).")
  does_not_fit = aot.compiler_out_of_memory(err)
  assert isinstance(does_not_fit, aot.DoesNotFit)
  assert "ran out of HBM (Ran out of memory on HBM" in str(does_not_fit) and "shard more" in str(does_not_fit)
  assert aot.compiler_out_of_memory(RuntimeError("INVALID_ARGUMENT: bad shape")) is None


def test_compile_tiny_config_for_v5p():
  """The train step of a 1-layer model compiled for 4 unattached v5p chips (the test command installs libtpu;
  under CI=true its absence fails, elsewhere it is a visible skip)."""
  require("libtpu", extra="tpu")
  from moejax.flops import model_flops
  from moejax.train import Experiment

  cfg = base_config()
  cfg.model.update(num_layers=1, d_model=64, num_heads=2, num_kv_heads=1, ffn_dim=128)
  cfg.data.seq_len, cfg.train.batch_size = 64, 8
  cfg.mesh.update(data=2, fsdp=2)
  devices = aot.topology_devices("v5p:2x2x1")
  report = aot.compile_train_step(cfg, "v5p:2x2x1", devices)
  assert report.devices == 4 and report.mesh["data"] == 2 and report.mesh["fsdp"] == 2
  assert report.tokens == 8 * 64
  assert report.model_flops == pytest.approx(model_flops(cfg.model, 64).train * 8 * 64 / 4)
  # Arguments hold at least this device's shards of the state (fp32 params and two Adam moments + batch).
  state = Experiment(cfg, devices=devices).abstract_state
  shard_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert report.memory["arguments"] >= shard_bytes
  assert report.memory["total"] >= report.memory["temporaries"] > 0
  assert report.xla_flops >= report.model_flops * 0.9
  assert "all-reduce" in report.collectives  # gradients reduced over data
  assert report.fits and "HBM per device" in str(report)
