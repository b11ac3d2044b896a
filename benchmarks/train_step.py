"""Train-step throughput of the tiny model, and what remat / accumulation cost.

  python benchmarks/train_step.py [--steps 20] [--config configs/tiny.py]

Every variant is timed in this run and reported as a ratio to the baseline
(no remat, one micro-batch), since absolute times on shared machines are noisy.
"""

import argparse
import statistics
import time

import jax

from moejax.config import load_config
from moejax.train import Experiment

VARIANTS = {
    "baseline": {},
    "remat=full": {"model.remat": "full"},
    "remat=dots": {"model.remat": "dots"},
    "grad_accum_steps=4": {"train.grad_accum_steps": 4},
    "bfloat16 compute": {"model.dtype": "bfloat16"},
}


def time_variant(config: str, overrides: dict, steps: int) -> float:
  cfg = load_config(config)
  with cfg.unlocked():
    for dotted, value in overrides.items():
      section, field = dotted.split(".")
      cfg[section][field] = value
  exp = Experiment(cfg, jax.devices()[:1])
  state, data = exp.init_state(), exp.data_iterator("train")
  batches = [next(data) for _ in range(steps + 2)]
  for batch in batches[:2]:  # compile + warm up
    state, metrics = exp.train_step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for batch in batches[2:]:
    start = time.perf_counter()
    state, metrics = exp.train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  cfg = load_config(args.config)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  print(f"{args.config}: batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens, "
        f"{jax.devices()[0].platform}, median of {args.steps} steps")
  print(f"{'variant':<22}{'step ms':>10}{'tokens/s':>12}{'ratio':>8}")
  base = None
  for name, overrides in VARIANTS.items():
    t = time_variant(args.config, overrides, args.steps)
    base = base or t
    print(f"{name:<22}{t * 1e3:>10.1f}{tokens / t:>12,.0f}{t / base:>8.2f}")


if __name__ == "__main__":
  main()
