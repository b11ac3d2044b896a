"""Train-step throughput of the tiny model, and what remat / accumulation /
hyper-connections / multi-token prediction cost.

  python benchmarks/train_step.py [--steps 20] [--rounds 1] [--config configs/tiny.py] [--variants a,b]

Every variant is timed in this run and reported as a ratio to the baseline
(the first variant), since absolute times on shared machines are noisy. With
``--rounds R`` the variants take turns, ``steps / R`` steps each per round, so
a burst of load from other jobs falls on all of them alike.
"""

import argparse
import statistics
import time

import jax

from moejax.config import load_config
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
  """One compiled variant; :meth:`time_steps` returns per-step seconds."""

  def __init__(self, config: str, overrides: dict):
    cfg = load_config(config)
    with cfg.unlocked():
      for dotted, value in overrides.items():
        *path, field = dotted.split(".")
        node = cfg
        for key in path:
          node = node[key]
        node[field] = value
    self.exp = Experiment(cfg, jax.devices()[:1])
    self.state, self.data = self.exp.init_state(), self.exp.data_iterator("train")
    self.time_steps(2)  # compile + warm up

  def time_steps(self, n: int) -> list[float]:
    batches, times = [next(self.data) for _ in range(n)], []
    for batch in batches:
      start = time.perf_counter()
      self.state, metrics = self.exp.train_step(self.state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    return times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated subset of: " + ", ".join(VARIANTS) + " (the first is the baseline)")
  args = parser.parse_args()
  names = args.variants.split(",")
  cfg = load_config(args.config)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  print(f"{args.config}: batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens, "
        f"{jax.devices()[0].platform}, median of {args.steps} steps in {args.rounds} round(s)")
  times = {name: [] for name in names}
  if args.rounds == 1:  # one variant alive at a time
    for name in names:
      times[name] = Variant(args.config, VARIANTS[name]).time_steps(args.steps)
  else:
    variants = {name: Variant(args.config, VARIANTS[name]) for name in names}
    for _ in range(args.rounds):
      for name, variant in variants.items():
        times[name] += variant.time_steps(max(1, args.steps // args.rounds))
  print(f"{'variant':<22}{'step ms':>10}{'tokens/s':>12}{'ratio':>8}")
  base = statistics.median(times[names[0]])
  for name in names:
    t = statistics.median(times[name])
    print(f"{name:<22}{t * 1e3:>10.1f}{tokens / t:>12,.0f}{t / base:>8.2f}")


if __name__ == "__main__":
  main()
