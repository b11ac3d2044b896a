"""What every benchmark in ``benchmarks/`` shares: interleaved timing, summaries with spread, and raw results with provenance.

A benchmark times its variants with :func:`interleaved` (every round runs each variant once, the order
rotating, so a burst of load from other jobs falls on all of them alike), summarises each variant with
:func:`summary` (median, quartiles, and the per-round ratio to the baseline measured in the same round),
and saves everything with :class:`Results`::

    results = Results("train_step", params=vars(args))     # records the load average now
    samples = interleaved({"baseline": step_a, "remat": step_b}, rounds=10)
    results.add_rows([{"variant": n, **summary(s, samples["baseline"])} for n, s in samples.items()])
    results.write()      # benchmarks/results/train_step/<UTC time>-<commit>.json

The JSON holds the raw samples, the command line, the commit (and whether the tree was dirty), the date,
the machine (CPU model, cores, memory, JAX backend and devices) and the load average before and after.
``docs/benchmarks.md`` tables are generated from these files by ``benchmarks/report.py``.
"""

from __future__ import annotations

import collections
import datetime
import glob
import gzip
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

RESULTS_DIR = os.path.join("benchmarks", "results")  # benchmarks run from the repository root


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
  """Runs each variant once per round, the order rotating by one each round.

  ``variants`` maps a name to a callable that runs one sample and returns its seconds. Returns the
  samples per name, in round order (sample ``r`` of every variant comes from round ``r``).
  """
  names = list(variants)
  samples: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      samples[name].append(float(variants[name]()))
  return samples


def summary(samples: list[float], baseline: list[float] | None = None) -> dict[str, Any]:
  """Median and quartiles of ``samples`` (seconds); with a ``baseline`` from the same rounds, the ratio
  of medians and the spread (min, median, max) of the per-round ratios."""
  q1, med, q3 = _quartiles(samples)
  out = {"n": len(samples), "median_s": med, "q1_s": q1, "q3_s": q3, "samples_s": list(samples)}
  if baseline is not None:
    ratios = [s / b for s, b in zip(samples, baseline)]
    out.update(ratio=med / statistics.median(baseline), ratio_min=min(ratios),
               ratio_median=statistics.median(ratios), ratio_max=max(ratios))
  return out


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
  if len(xs) == 1:
    return xs[0], xs[0], xs[0]
  q = statistics.quantiles(xs, n=4, method="inclusive")
  return q[0], q[1], q[2]


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def machine() -> dict[str, Any]:
  """CPU model, core counts, memory, OS, Python and (if imported) JAX's backend and devices."""
  info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "os": platform.platform(), "python": platform.python_version()}
  try:
    info["cores_usable"] = len(os.sched_getaffinity(0))
  except AttributeError:
    pass
  for line in _read_lines("/proc/cpuinfo"):
    if line.startswith("model name"):
      info["cpu"] = line.split(":", 1)[1].strip()
      break
  for line in _read_lines("/proc/meminfo"):
    if line.startswith("MemTotal"):
      info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
  if "jax" in sys.modules:
    import jax

    info.update(jax=jax.__version__, backend=jax.default_backend(),
                devices=sorted({d.device_kind for d in jax.devices()}), device_count=jax.device_count())
  return info


def _read_lines(path: str) -> list[str]:
  try:
    with open(path) as f:
      return f.read().splitlines()
  except OSError:
    return []


def git_commit() -> dict[str, Any]:
  """{"commit": sha or None, "dirty": whether tracked files differ from it}, of the working directory's repo.

  ``MOEJAX_COMMIT``, when set, names the commit instead (dirtiness unknown: None): for a tree copied to
  a cluster or an accelerator host without its ``.git``, or with a stale one.
  """
  if os.environ.get("MOEJAX_COMMIT"):
    return {"commit": os.environ["MOEJAX_COMMIT"], "dirty": None}
  run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, check=False)
  try:
    sha = run("rev-parse", "HEAD").stdout.strip() or None
  except OSError:  # no git on this machine
    return {"commit": None, "dirty": None}
  return {"commit": sha, "dirty": bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip()) if sha
          else None}


class Results:
  """Raw results of one benchmark run, written with their provenance."""

  def __init__(self, benchmark: str, params: dict[str, Any] | None = None, directory: str = RESULTS_DIR):
    self.benchmark, self.directory = benchmark, directory
    self.started = datetime.datetime.now(datetime.timezone.utc)
    self.record: dict[str, Any] = {
        "benchmark": benchmark, "command": shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "params": dict(params or {}), "date": self.started.isoformat(timespec="seconds"),
        "load_average_before": load_average(), **git_commit(), "rows": []}

  def add_rows(self, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Appends result rows (one dict per variant / size); ``extra`` sets top-level fields."""
    self.record["rows"].extend(rows)
    self.record.update(extra)

  def write(self) -> str:
    """Writes ``<directory>/<benchmark>/<UTC time>-<commit>.json`` and returns its path."""
    self.record.update(machine=machine(), load_average_after=load_average(),
                       seconds=round((datetime.datetime.now(datetime.timezone.utc) - self.started).total_seconds(), 1))
    folder = os.path.join(self.directory, self.benchmark)
    os.makedirs(folder, exist_ok=True)
    stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(folder, f"{stamp}-{(self.record['commit'] or 'nogit')[:8]}.json")
    with open(path, "w") as f:
      json.dump(self.record, f, indent=1, default=_jsonable)
    print(f"raw results: {os.path.relpath(path)}")
    return path


def _jsonable(x: Any) -> Any:
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, tuple):
    return list(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def latest(benchmark: str, directory: str = RESULTS_DIR, **params: Any) -> dict[str, Any] | None:
  """The newest result of ``benchmark`` whose ``params`` include ``params`` (None if there is none)."""
  folder = os.path.join(directory, benchmark)
  if not os.path.isdir(folder):
    return None
  for name in sorted(os.listdir(folder), reverse=True):
    if name.endswith(".json"):
      path = os.path.join(folder, name)
      with open(path) as f:
        record = json.load(f)
      record["_file"] = path
      if all(record.get("params", {}).get(k) == v for k, v in params.items()):
        return record
  return None


def top_ops(fn, *args, repeats: int = 3, count: int = 20) -> list[dict[str, Any]]:
  """Where a jitted ``fn(*args)`` spends its time, by XLA op: a ``jax.profiler`` trace of ``repeats``
  calls (after one warm-up), the ``count`` ops with the most time per call.

  Each row: ``{"op", "ms_per_call", "calls", "shape", "source"}``; ``shape`` and ``source`` (the
  JAX operation and module path XLA records as ``op_name``) come from the compiled HLO, so a fusion
  reads as the einsum or layer it came from. Leaf ops only: no Python frames, executor spans, or
  while/conditional ops (whose spans hold their bodies' ops, which are counted themselves).
  """
  import jax

  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  hlo = fn.lower(*args).compile().as_text()
  defs = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.-]+) = (.*)$", hlo, re.M)}
  total, calls = collections.Counter(), collections.Counter()
  control_flow = re.compile(r"\s(while|conditional|call)\(")  # their spans hold their bodies' ops
  for e in events:
    if e.get("ph") == "X" and "dur" in e and e["name"] in defs and not control_flow.search(defs[e["name"]]):
      total[e["name"]] += e["dur"]
      calls[e["name"]] += 1
  rows = []
  for name, us in total.most_common(count):
    text = defs[name]
    source = re.search(r'op_name="([^"]*)"', text)
    rows.append({"op": name, "ms_per_call": us / 1e3 / repeats, "calls": calls[name] / repeats,
                 "shape": text.split(" ", 1)[0], "source": source.group(1) if source else ""})
  return rows
