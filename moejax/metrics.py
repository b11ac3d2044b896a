"""Where training metrics go: ``metrics.jsonl``, TensorBoard and a progress bar.

``metrics.jsonl`` holds one JSON object per logged step with at least ``step``
and ``loss``; scripts depend on those names. Vector metrics (per-expert
loads) are lists there and histograms in TensorBoard. On resume, records past the
restored step are dropped (from the JSONL and, via ``purge_step``, from
TensorBoard) so the files read as one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import tqdm
from tensorboardX import SummaryWriter


def _truncate_jsonl(path: str, last_step: int) -> None:
  if not os.path.exists(path):
    return
  records = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= last_step:
          records.append(line)
      except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
        continue
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(records)
  os.replace(tmp, path)


def _jsonable(value) -> float | list[float]:
  """A scalar as float; a vector (e.g. per-expert load) as a list of 5-digit floats."""
  array = np.asarray(value, np.float64)
  return float(array) if array.ndim == 0 else [float(f"{x:.5g}") for x in array.ravel()]


@dataclasses.dataclass(frozen=True)
class Throughput:
  """Model FLOPs behind ``tokens_per_s`` (moejax/flops.py): per-device TFLOP/s and, where the device's
  peak is known, MFU."""

  train_flops_per_token: float   # forward + backward model FLOPs (remat recompute not counted)
  num_devices: int
  peak_flops_per_device: float | None  # None (e.g. CPU): MFU is not reported

  def metrics(self, tokens_per_s: float) -> dict[str, float]:
    per_device = self.train_flops_per_token * tokens_per_s / self.num_devices
    out = {"model_tflops_per_s": per_device / 1e12}
    if self.peak_flops_per_device:
      out["mfu"] = per_device / self.peak_flops_per_device
    return out


class MetricsWriter:
  """Writes scalar metrics for one run; only process 0 should create one."""

  def __init__(self, workdir: str, start_step: int, total_steps: int, tokens_per_step: int,
               throughput: "Throughput | None" = None):
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    _truncate_jsonl(self.jsonl_path, start_step)
    self._jsonl = open(self.jsonl_path, "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
    self._tokens_per_step = tokens_per_step
    self._throughput = throughput
    self._last = (start_step, time.perf_counter())
    self._first: tuple[int, float] | None = None  # the first logged step: the ETA's clock starts after compiling
    self._interactive = sys.stderr.isatty()
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                          disable=not self._interactive)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    last_step, last_time = self._last
    now = time.perf_counter()
    if step > last_step:
      tokens_per_s = (step - last_step) * self._tokens_per_step / (now - last_time)
      metrics = dict(metrics, tokens_per_s=tokens_per_s,
                     **(self._throughput.metrics(tokens_per_s) if self._throughput else {}))
    self._last = (step, now)
    self._first = self._first or (step, now)
    record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if k == "step":
        continue
      if isinstance(v, list):  # a per-item vector, e.g. expert loads
        if all(math.isfinite(x) for x in v):
          self._tb.add_histogram(k, np.asarray(v), step)
      elif math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    self._progress(step, record)

  def _progress(self, step: int, record: dict[str, float]) -> None:
    shown = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in record}
    text = " ".join(f"{k}={v:.4g}" if k != "tokens_per_s" else f"tok/s={v:,.0f}" for k, v in shown.items())
    if self._interactive:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(text)
    else:
      print(f"step {step}/{self._bar.total} {text} eta={self.eta(step)}", file=sys.stderr, flush=True)

  def eta(self, step: int) -> str:
    """Seconds left at the rate since the first logged step (so not counting compilation), or "?"."""
    first_step, first_time = self._first or (step, 0.0)
    if step <= first_step:
      return "?"
    rate = (step - first_step) / max(time.perf_counter() - first_time, 1e-9)
    return f"{(self._bar.total - step) / rate:.0f}s"

  def close(self) -> None:
    self._bar.close()
    self._jsonl.close()
    self._tb.close()
