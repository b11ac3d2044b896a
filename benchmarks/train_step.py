"""Train-step throughput of the tiny model, and what remat / accumulation /
hyper-connections / multi-token prediction cost.

  python benchmarks/train_step.py [--rounds 10] [--config configs/tiny.py] [--variants a,b]

Every variant is compiled first, then the variants take turns (one step each per
round, the order rotating, ``moejax/benchmarking.py``), so load from other jobs falls
on all of them alike. Reported: the median step time with its quartiles, and the
ratio to the baseline (the first variant) with the spread of the per-round ratios.
Raw samples and provenance go to ``benchmarks/results/train_step/``.
"""

import argparse
import time

import jax

from moejax.benchmarking import Results, interleaved, summary
from moejax.config import load_config
from moejax.config_apply import apply_config
from moejax.train import Experiment

VARIANTS = {
    "baseline": {},
    "remat=full": {"model.remat": ("full",)},
    "remat=dots": {"model.remat": ("dots",)},
    "grad_accum_steps=4": {"train.grad_accum_steps": 4},
    "bfloat16 compute": {"model.dtype": "bfloat16"},
    "mHC streams=4": {"model.hc.streams": 4},
    "MTP depth=1": {"model.mtp.depth": 1},
    "mHC=4 + MTP=1": {"model.hc.streams": 4, "model.mtp.depth": 1},
}


class Variant:
  """One compiled variant; :meth:`step` runs and times one train step on the next batch."""

  def __init__(self, config: str, overrides: dict):
    cfg = load_config(config)
    with cfg.unlocked():
      apply_config(cfg, overrides)
    self.start(Experiment(cfg, jax.devices()[:1]))

  def start(self, exp, data=None):
    self.exp = exp
    self.state, self.data = exp.init_state(), data or exp.data_iterator("train")
    for _ in range(2):  # compile + warm up
      self.step()

  def step(self) -> float:
    batch = next(self.data)
    start = time.perf_counter()
    self.state, metrics = self.exp.train_step(self.state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def table(record: dict) -> str:
  """Markdown: one row per variant (``benchmarks/report.py``)."""
  tokens = record["tokens_per_step"]
  lines = ["| variant | step ms (median, quartiles) | tokens/s | ratio to baseline (per-round range) |",
           "|---|---|---|---|"]
  for r in record["rows"]:
    lines.append(f"| {r['variant']} | {r['median_s'] * 1e3:.1f} ({r['q1_s'] * 1e3:.0f}-{r['q3_s'] * 1e3:.0f}) | "
                 f"{tokens / r['median_s']:,.0f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated subset of: " + ", ".join(VARIANTS) + " (the first is the baseline)")
  args = parser.parse_args()
  names = args.variants.split(",")
  results = Results("train_step", params={"config": args.config, "variants": names, "rounds": args.rounds})
  variants = {name: Variant(args.config, VARIANTS[name]) for name in names}
  cfg = variants[names[0]].exp.cfg
  tokens = cfg.train.batch_size * cfg.data.seq_len
  print(f"{args.config}: batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens, "
        f"{jax.devices()[0].platform}, {args.rounds} interleaved rounds")
  samples = interleaved({name: v.step for name, v in variants.items()}, args.rounds)
  results.add_rows([{"variant": n, "overrides": VARIANTS[n], **summary(s, samples[names[0]])}
                    for n, s in samples.items()], tokens_per_step=tokens)
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  main()
