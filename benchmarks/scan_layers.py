"""Compile time and step time of ``model.scan_layers`` against the unrolled model, as ratios.

  python benchmarks/scan_layers.py [--layers 4,16] [--rounds 3] [--steps 5]

Models: ``configs/tiny_hybrid.py:v4`` (the DeepSeek-V4 hybrid schedule at tiny width: swa, then
(csa, hca) pairs with MoE, mHC) at each ``--layers`` depth (the schedule's pair repeated; the scan
covers all but the first layer). Per round, for each (depth, scan on/off) in rotating order: the
train step's ahead-of-time compile (``Experiment.lower_train_step().compile()``, XLA's own caches
cleared first, so each is a fresh compile), then ``--steps`` timed steps. Ratios are to the
unrolled model of the same depth in the same round. Raw samples and provenance go to
``benchmarks/results/scan_layers/``.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from moejax.benchmarking import Results, summary
from moejax.config import load_config
from moejax.models.scan import plan_of
from moejax.sharding import put_batch
from moejax.train import Experiment


def config(layers: int, scan: bool):
  cfg = load_config("configs/tiny_hybrid.py:v4")
  schedule = ("swa",) + ("csa", "hca") * ((layers - 1) // 2)
  cfg.model.update(num_layers=len(schedule), attention_types=schedule, mlp_types=("moe",), scan_layers=scan)
  cfg.train.batch_size = 4
  return cfg


def measure(layers: int, scan: bool, steps: int) -> tuple[float, float, float]:
  """(lower + compile seconds, median step seconds, last loss) of a freshly built experiment."""
  jax.clear_caches()
  cfg = config(layers, scan)
  exp = Experiment(cfg, jax.devices()[:1])
  start = time.perf_counter()
  step = exp.lower_train_step().compile()
  compile_s = time.perf_counter() - start
  state = exp.lower_init().compile()(jax.random.key(cfg.seed))
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1))
  b, t = cfg.train.batch_size, cfg.data.seq_len
  batch = put_batch({"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                     "weights": np.ones((b, t), np.float32), "segment_ids": np.ones((b, t), np.int32),
                     "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}, exp.mesh)
  times = []
  for _ in range(steps + 1):
    begin = time.perf_counter()
    state, metrics = step(state, batch, exp.extra)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - begin)
  return compile_s, float(np.median(times[1:])), float(metrics["loss"])


def table(record: dict) -> str:
  """Markdown: per depth, compile and step time scanned vs unrolled (``benchmarks/report.py``)."""
  lines = ["| layers | variant | compile s (quartiles) | compile x unrolled (per-round range) | "
           "step ms (quartiles) | step x unrolled (per-round range) |", "|---|---|---|---|---|---|"]
  for r in record["rows"]:
    c, s = r["compile"], r["step"]
    ratio = lambda x: f"{x['ratio']:.2f} ({x['ratio_min']:.2f}-{x['ratio_max']:.2f})" if "ratio" in x else "1"
    lines.append(f"| {r['layers']} | {r['variant']} | {c['median_s']:.1f} ({c['q1_s']:.1f}-{c['q3_s']:.1f}) | "
                 f"{ratio(c)} | {s['median_s'] * 1e3:.0f} ({s['q1_s'] * 1e3:.0f}-{s['q3_s'] * 1e3:.0f}) | "
                 f"{ratio(s)} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", default="5,17", help="depths (odd: swa + (csa, hca) pairs)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  depths = [int(x) for x in args.layers.split(",")]
  results = Results("scan_layers", params=vars(args))
  variants = [(layers, scan) for layers in depths for scan in (False, True)]
  samples = {v: {"compile": [], "step": [], "loss": []} for v in variants}
  for r in range(args.rounds):
    for v in variants[r % len(variants):] + variants[:r % len(variants)]:
      compile_s, step_s, loss = measure(*v, args.steps)
      print(f"round {r}: {v[0]} layers, scan={v[1]}: compile {compile_s:.1f} s, step {step_s * 1e3:.0f} ms, "
            f"loss {loss:.4f}", flush=True)
      for key, value in (("compile", compile_s), ("step", step_s), ("loss", loss)):
        samples[v][key].append(value)
  rows = []
  for layers, scan in variants:
    base, own = samples[(layers, False)], samples[(layers, scan)]
    plan = plan_of(config(layers, scan).model)
    rows.append({"layers": layers, "variant": f"scanned ({plan.repeats} x {plan.period})" if scan else "unrolled",
                 "compile": summary(own["compile"], base["compile"] if scan else None),
                 "step": summary(own["step"], base["step"] if scan else None), "losses": own["loss"]})
  results.add_rows(rows)
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  main()
