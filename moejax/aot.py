"""Ahead-of-time compilation of the train step for a TPU topology that is not attached.

``moejax compile --config C --topology v5p:2x2x1`` (MaxText's ``train_compile``):
``jax.experimental.topologies.get_topology_desc`` (needs ``libtpu``: ``pip install
-e .[tpu]``) describes the chips; the experiment's mesh is built over them, the train
step is lowered on abstract state and batch (``ShapeDtypeStruct``s, nothing is
allocated) and compiled by the TPU compiler on this machine. The report:

* **HBM per device** from ``compiled.memory_analysis()``: arguments (state + batch),
  outputs, temporaries; total = arguments + outputs - aliased (the donated state) +
  temporaries + generated code, against the chip's capacity (:data:`CHIPS`).
* **FLOPs per step per device**: XLA's ``cost_analysis()`` next to moejax.flops' model
  count (3 x forward per token x tokens / devices; XLA's also holds remat recompute,
  the optimizer and elementwise work; both count a loop body once, see below).
* **Collectives** in the optimized HLO by kind: count and result bytes (the larger
  buffer of an async ``-start``). An op inside a while loop (grad accumulation,
  ``lax.scan``) is listed once, not once per trip.
* **Roofline**: compute time = XLA FLOPs / peak (the model's FLOPs where XLA's are
  fewer: it counts a scanned layer stack's body once), HBM time = XLA bytes accessed / HBM
  bandwidth, collective time = collective bytes / ICI bandwidth per chip; the step
  takes at least the largest of them (perfect overlap) and at most their sum; MFU
  is the model FLOPs over the devices' peak in that time. A lower bound on step
  time, so an upper bound on MFU, from datasheet numbers.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re

import ml_collections

from moejax.flops import model_flops, peak_flops

GiB = 2 ** 30
# Per chip, from Google Cloud's TPU datasheets: HBM bytes, HBM bytes/s, ICI bytes/s (all links, one direction).
CHIPS = {
    "v4": dict(hbm=32 * GiB, hbm_bw=1228e9, ici_bw=300e9),
    "v5e": dict(hbm=16 * GiB, hbm_bw=819e9, ici_bw=200e9),
    "v5p": dict(hbm=95 * GiB, hbm_bw=2765e9, ici_bw=600e9),
    "v6e": dict(hbm=32 * GiB, hbm_bw=1640e9, ici_bw=448e9),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_COLLECTIVE_RE = re.compile(r"=\s+(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")


class DoesNotFit(Exception):
  """The compiled step needs more HBM per device than the chip has."""


def chip_of(topology: str) -> str:
  """``"v5p:2x2x1"`` -> ``"v5p"``; a clear error for a chip without datasheet numbers."""
  name = topology.lower().replace("tpu", "").strip(" _-")
  chip = re.match(r"v[0-9]+[a-z]*", name)
  chip = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}.get(chip and chip.group(0), chip and chip.group(0))
  if chip not in CHIPS:
    raise ValueError(f"--topology {topology!r}: unknown chip {chip!r}; known: {', '.join(CHIPS)} "
                     "(e.g. v5p:2x2x1, v4:2x2x2, v5e:4x4, v6e:2x2).")
  return chip


def collective_bytes(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {"count", "bytes"}} of the collectives in an HLO module's text (see the module docstring)."""
  out: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for line in hlo_text.splitlines():
    match = _COLLECTIVE_RE.search(line)
    if not match:
      continue
    shape, kind, is_async = match.groups()
    sizes = [_ITEM_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY_RE.findall(shape)]
    out[kind]["count"] += 1
    out[kind]["bytes"] += (max(sizes) if is_async else sum(sizes)) if sizes else 0
  return dict(out)


@dataclasses.dataclass
class Report:
  """What :func:`compile_train_step` measured; ``str()`` is the printed report."""
  topology: str
  chip: str
  devices: int
  mesh: dict
  compile_s: float
  memory: dict          # bytes per device: arguments, outputs, aliased, temporaries, code, total
  xla_flops: float      # per device per step
  xla_bytes: float      # HBM bytes accessed per device per step
  model_flops: float    # per device per step: moejax.flops train count (no remat)
  tokens: int           # per step (global)
  collectives: dict

  @property
  def capacity(self) -> float:
    return CHIPS[self.chip]["hbm"]

  @property
  def fits(self) -> bool:
    return self.memory["total"] <= self.capacity

  @property
  def loops_undercount(self) -> bool:
    """XLA's count is below the model's: it counted a loop body (scanned layers, grad accumulation) once."""
    return self.xla_flops < self.model_flops

  def roofline(self) -> dict[str, float]:
    chip, peak = CHIPS[self.chip], peak_flops(f"tpu {self.chip}")
    # The model count is work the step certainly does; XLA's, when below it, is per loop trip.
    times = {"compute_s": max(self.xla_flops, self.model_flops) / peak, "hbm_s": self.xla_bytes / chip["hbm_bw"],
             "collective_s": sum(c["bytes"] for c in self.collectives.values()) / chip["ici_bw"]}
    low, high = max(times.values()), sum(times.values())
    return times | {"step_s_min": low, "step_s_max": high, "mfu_max": self.model_flops / (peak * low),
                    "mfu_min": self.model_flops / (peak * high)}

  def __str__(self) -> str:
    m, r, g = self.memory, self.roofline(), lambda b: f"{b / GiB:8.2f} GiB"
    lines = [f"compiled the train step for {self.topology} ({self.devices} chips, mesh "
             f"{', '.join(f'{k}={v}' for k, v in self.mesh.items() if v > 1) or 'single device'}) "
             f"in {self.compile_s:.1f} s",
             "HBM per device:",
             f"  arguments    {g(m['arguments'])}   (parameters, optimizer state, batch)",
             f"  outputs      {g(m['outputs'])}   (aliased with donated arguments: {g(m['aliased']).strip()})",
             f"  temporaries  {g(m['temporaries'])}",
             f"  total        {g(m['total'])}   of {self.capacity / GiB:.0f} GiB ({m['total'] / self.capacity:.0%})",
             f"FLOPs per device per step: XLA {self.xla_flops:.3e}, model (moejax.flops, 6N-style, no remat) "
             f"{self.model_flops:.3e} (XLA / model = {self.xla_flops / max(self.model_flops, 1):.2f}); "
             f"{self.tokens} tokens per step",
             "collectives (per device, loop bodies once):"]
    for kind, c in sorted(self.collectives.items()):
      lines.append(f"  {kind:20s} {int(c['count']):5d} ops {c['bytes'] / 2 ** 20:12.1f} MiB")
    if not self.collectives:
      lines.append("  none")
    lines += [f"roofline ({self.chip}: {peak_flops(f'tpu {self.chip}') / 1e12:.0f} TFLOP/s bf16, "
              f"{CHIPS[self.chip]['hbm_bw'] / 1e9:.0f} GB/s HBM, {CHIPS[self.chip]['ici_bw'] / 1e9:.0f} GB/s ICI): "
              f"compute {r['compute_s'] * 1e3:.2f} ms, HBM {r['hbm_s'] * 1e3:.2f} ms, collectives "
              f"{r['collective_s'] * 1e3:.2f} ms",
              f"  step time {r['step_s_min'] * 1e3:.2f} to {r['step_s_max'] * 1e3:.2f} ms (full to no overlap); "
              f"MFU at most {r['mfu_max']:.1%} (no overlap: {r['mfu_min']:.1%})"]
    if self.loops_undercount:
      lines.append("  XLA counted each loop body once (scanned layers, grad accumulation): compute time uses the "
                   "model's FLOPs; HBM and collective times are per loop trip, so the step time is a loose lower "
                   "bound")
    return "\n".join(lines)


def topology_devices(topology: str) -> list:
  """The devices of an unattached TPU topology (``libtpu`` must be installed)."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise ImportError("moejax compile needs libtpu to compile for TPU: pip install -e '.[tpu]' "
                      "(a separate venv keeps the CPU one unchanged)") from None
  from jax.experimental import topologies

  # Compiling attaches to no chip, so several processes (pytest workers, a sweep) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def compile_train_step(cfg: ml_collections.ConfigDict, topology: str, devices=None) -> Report:
  """Lowers and compiles ``cfg``'s train step for ``topology`` on this machine; nothing runs."""
  import time

  from moejax.train import Experiment

  chip = chip_of(topology)
  devices = topology_devices(topology) if devices is None else devices
  exp = Experiment(cfg, devices=devices)
  batch, seq = cfg.train.batch_size, cfg.data.seq_len
  start = time.perf_counter()
  try:
    compiled = exp.lower_train_step().compile()
  except Exception as err:  # noqa: BLE001 -- only the compiler's out-of-memory refusal is translated
    raise compiler_out_of_memory(err) or err from err
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  memory = dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
                code=mem.generated_code_size_in_bytes)
  memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                     + memory["code"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  tokens = batch * seq
  return Report(topology=topology, chip=chip, devices=len(devices), mesh=dict(exp.mesh.shape), compile_s=compile_s,
                memory=memory, xla_flops=float(cost.get("flops", 0.0)),
                xla_bytes=float(cost.get("bytes accessed", 0.0)),
                model_flops=model_flops(cfg.model, seq).train * tokens / len(devices), tokens=tokens,
                collectives=collective_bytes(compiled.as_text()))


FIT_ADVICE = ("use a larger topology, shard more (mesh.fsdp / mesh.expert / mesh.tensor), lower "
              "train.batch_size or raise train.grad_accum_steps, or set model.remat=full.")


def check_fits(report: Report) -> None:
  """Raises :class:`DoesNotFit` with what to change when the step needs more HBM than the chip has."""
  if not report.fits:
    raise DoesNotFit(f"the train step needs {report.memory['total'] / GiB:.1f} GiB per device, more than a "
                     f"{report.chip} chip's {report.capacity / GiB:.0f} GiB: {FIT_ADVICE}")


def compiler_out_of_memory(err: Exception) -> DoesNotFit | None:
  """The TPU compiler refuses a program that cannot fit HBM (``RESOURCE_EXHAUSTED: Ran out of memory on
  HBM ...``) before any memory analysis exists: that refusal as :class:`DoesNotFit`, else None."""
  text = str(err)
  if "RESOURCE_EXHAUSTED" not in text or "memory" not in text:
    return None
  line = next((ln.strip() for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln), text.splitlines()[0])
  return DoesNotFit(f"the TPU compiler ran out of HBM ({line.split('RESOURCE_EXHAUSTED:', 1)[-1].strip()}): "
                    f"{FIT_ADVICE}")
