"""The 1M-token training step: peak memory and time, and the largest T that fits per attention schedule.

  python benchmarks/long_context.py                       # both parts, T = 1,048,576
  python benchmarks/long_context.py --skip-search         # only the measured step(s) and the remat comparison
  python benchmarks/long_context.py --skip-step --budget-gb 20 --max-log2 24 --rss-max-log2 16

Model: ``configs/v4_1m.py`` (tiny DeepSeek-V4-shaped: swa/csa/hca + MoE,
every block rematerialised), batch 1, one device (the first of
``jax.devices()``: CPU, or the GPU when there is one).

* Step: the real ``Experiment`` train step (forward, backward, optimizer
  update) on one stdlib row of T tokens, run only if its compiled memory
  estimate is within ``--budget-gb`` (else the estimate is printed). Time: wall time of the second step
  (the first compiles). Memory: the compiled program's buffers (XLA memory
  analysis: arguments + outputs + temporaries - donated), the process's peak
  RSS (includes the compiler, the data pipeline and Python), and on GPU the
  allocator's ``peak_bytes_in_use``. The baseline ratio is against T = 1/16 of
  the length, measured in the same run (``--base-log2``).
* Remat: the compiled step at the baseline length without remat, with
  ``remat=full`` under XLA's default passes (on CPU they merge the
  recomputation back into the forward pass) and with ``remat=full`` as
  moejax compiles it (``moejax.models.block.remat_compiler_options``).
* Search: for each schedule (dense, sliding, dsa, v4 hybrid: the same widths,
  MoE and remat), T doubles from 2^14 while the compiled train step's
  memory estimate stays under ``--budget-gb`` (nothing is run, so a too-large
  T cannot take the machine down); prints the largest T that fits. Beside the
  estimate, for T <= 2^``--rss-max-log2`` one real step runs in a fresh
  process and its peak RSS is measured, so the estimate can be checked.

Raw results and provenance go to ``benchmarks/results/long_context/``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import jax

from moejax.benchmarking import Results
from moejax.config import load_config
from moejax.validation import validate
from moejax.models.block import remat_compiler_options
from moejax.train import Experiment

SCHEDULES = {
    "dense": ("dense",) * 4,
    "sliding": ("sliding",) * 4,
    "dsa": ("dsa",) * 4,
    "v4": None,  # the config's own swa/csa/hca schedule
}


def config(seq_len: int, schedule: str = "v4"):
  cfg = load_config(f"configs/v4_1m.py:t={seq_len}")
  if SCHEDULES[schedule]:
    cfg.model.attention_types = SCHEDULES[schedule]
  if schedule == "dsa":  # MLA widths for the latent attention
    cfg.model.attention.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32)
  cfg.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=1)
  validate(cfg, 1)
  return cfg


def compiled_bytes(exp: Experiment, compiler_options: dict | None = None) -> int:
  """Peak buffer bytes of the compiled train step (arguments + outputs + temporaries - donated);
  ``compiler_options`` replace the experiment's own XLA options."""
  mem = exp.lower_train_step().compile(compiler_options).memory_analysis()
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def measure_step(seq_len: int, budget_bytes: float, schedule: str = "v4") -> dict:
  """Runs two steps at ``seq_len``, or none if the compiled step needs more than ``budget_bytes``."""
  device = jax.devices()[:1]
  exp = Experiment(config(seq_len, schedule), device)
  estimate = compiled_bytes(exp)
  if estimate > budget_bytes:
    return {"seq_len": seq_len, "compiled_gib": estimate / 2**30, "fits": False}
  state, data = exp.init_state(), exp.data_iterator("train")
  batch = next(data)
  times, losses = [], []
  for _ in range(2):
    start = time.perf_counter()
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics["loss"]))  # blocks until the step is done
    times.append(time.perf_counter() - start)
  stats = device[0].memory_stats() or {}
  return {"seq_len": seq_len, "fits": True, "first_step_s": times[0], "step_s": times[1], "loss": losses,
          "compiled_gib": estimate / 2**30, "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "device_peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "documents": int(batch["segment_ids"].max())}


def remat_effect(seq_len: int) -> list[dict]:
  """Compiled memory at ``seq_len`` without remat, with ``remat=full`` under XLA's
  default passes, and with ``remat=full`` as moejax compiles it (``remat_compiler_options``)."""
  rows = []
  xla_default = {key: "" for key in remat_compiler_options(jax.devices()[0].platform)}  # undo moejax's options
  for name, remat, options in (("remat=none", "none", None), ("remat=full, XLA default passes", "full", xla_default),
                               ("remat=full (moejax)", "full", None)):
    cfg = config(seq_len)
    cfg.model.remat = (remat,)
    need = compiled_bytes(Experiment(cfg, jax.devices()[:1]), options)
    rows.append({"variant": name, "seq_len": seq_len, "compiled_gib": need / 2**30})
    print(f"  {name:32s} T={seq_len:,} {need / 2**30:8.2f} GiB", flush=True)
  return rows


def measured_rss(seq_len: int, schedule: str, budget_gb: float) -> float:
  """Peak RSS (GiB) of a fresh process that builds the experiment and runs two steps at ``seq_len``."""
  out = subprocess.run([sys.executable, __file__, "--child-step", schedule, str(seq_len), "--budget-gb", str(budget_gb)],
                       capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])["rss_peak_gib"]


def largest_fitting(schedule: str, budget_bytes: float, lo_log2: int, hi_log2: int, rss_max_log2: int) -> dict:
  fits, rows = None, []
  for log2 in range(lo_log2, hi_log2 + 1):
    start = time.perf_counter()
    need = compiled_bytes(Experiment(config(1 << log2, schedule), jax.devices()[:1]))
    rows.append({"seq_len": 1 << log2, "compiled_gib": need / 2**30, "compile_s": time.perf_counter() - start})
    if log2 <= rss_max_log2 and need <= budget_bytes:
      rows[-1]["rss_peak_gib"] = measured_rss(1 << log2, schedule, budget_bytes / 2**30)
    print(f"  {schedule:8s} T=2^{log2:<2d} {need / 2**30:8.2f} GiB {rows[-1].get('rss_peak_gib', '')}", flush=True)
    if need > budget_bytes:
      break
    fits = 1 << log2
  return {"schedule": schedule, "largest_t": fits, "rows": rows}


def table(record: dict) -> str:
  """Markdown: the measured steps, the remat comparison and the search (``benchmarks/report.py``)."""
  out = []
  if record.get("steps"):
    out += ["| T | step (s) | first step incl. compile (s) | compiled estimate (GiB) | measured peak RSS (GiB) | "
            "device peak (GiB) | loss (2 steps) |", "|---|---|---|---|---|---|---|"]
    for r in record["steps"]:
      if not r["fits"]:
        out.append(f"| {r['seq_len']:,} | not run: the compiled step needs {r['compiled_gib']:.1f} GiB | | | | | |")
        continue
      out.append(f"| {r['seq_len']:,} | {r['step_s']:.1f} | {r['first_step_s']:.1f} | {r['compiled_gib']:.2f} | "
                 f"{r['rss_peak_gib']:.2f} | {r['device_peak_gib']:.2f} | {r['loss'][0]:.3f}, {r['loss'][1]:.3f} |")
    out.append("")
  if record.get("remat"):
    rows = record["remat"]
    out += [f"| variant (T = {rows[0]['seq_len']:,}) | compiled train step (GiB) | x of remat=none |", "|---|---|---|"]
    out += [f"| {r['variant']} | {r['compiled_gib']:.2f} | {r['compiled_gib'] / rows[0]['compiled_gib']:.2f} |"
            for r in rows]
    out.append("")
  if record.get("search"):
    lengths = sorted({r["seq_len"] for f in record["search"] for r in f["rows"]})
    budget = record["params"]["budget_gb"]
    out += ["Compiled train-step **estimate** in GiB (XLA memory analysis; nothing run), and in brackets the "
            "**measured** peak RSS of a real two-step run in a fresh process where one was made:", "",
            "| schedule | " + " | ".join(f"2^{n.bit_length() - 1}" for n in lengths) +
            f" | largest T with estimate <= {budget:g} GiB |", "|---|" + "---|" * (len(lengths) + 1)]
    for f in record["search"]:
      by_t = {r["seq_len"]: r for r in f["rows"]}
      cell = lambda r: "" if r is None else f"{r['compiled_gib']:.2f}" + (
          f" ({r['rss_peak_gib']:.2f})" if "rss_peak_gib" in r else "")
      out.append(f"| {f['schedule']} | " + " | ".join(cell(by_t.get(t)) for t in lengths) +
                 f" | {f['largest_t'] or 'none'} |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--log2", type=int, default=20, help="log2 of the measured sequence length (20 = 1,048,576)")
  p.add_argument("--base-log2", type=int, default=16, help="log2 of the baseline length measured in the same run")
  p.add_argument("--budget-gb", type=float, default=20.0,
                 help="memory budget, GiB: the search's limit, and no step runs whose compiled estimate exceeds it")
  p.add_argument("--min-log2", type=int, default=14)
  p.add_argument("--max-log2", type=int, default=24)
  p.add_argument("--rss-max-log2", type=int, default=0,
                 help="search: also run a real step in a fresh process and measure its peak RSS up to this T")
  p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
  p.add_argument("--skip-step", action="store_true")
  p.add_argument("--skip-search", action="store_true")
  p.add_argument("--skip-remat", action="store_true", help="skip the remat comparison at the baseline length")
  p.add_argument("--child-step", nargs=2, metavar=("SCHEDULE", "T"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child_step:
    schedule, seq_len = args.child_step
    print(json.dumps(measure_step(int(seq_len), args.budget_gb * 2**30, schedule)))
    return
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
  results = Results("long_context", params={k: v for k, v in vars(args).items() if k != "child_step"})
  if not args.skip_step:
    budget = args.budget_gb * 2**30
    results.add_rows([], steps=[measure_step(1 << args.base_log2, budget), measure_step(1 << args.log2, budget)])
  if not args.skip_remat:
    results.add_rows([], remat=remat_effect(1 << args.base_log2))
  if not args.skip_search:
    results.add_rows([], search=[largest_fitting(s, args.budget_gb * 2**30, args.min_log2, args.max_log2,
                                                 args.rss_max_log2) for s in args.schedules])
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  sys.exit(main())
