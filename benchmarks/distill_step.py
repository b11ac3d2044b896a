"""Student step time with distillation (configs/distill_tiny.py), as ratios to plain LM training.

  PYTHONPATH=. python benchmarks/distill_step.py [--steps 20] [--rounds 4]

Variants, all on the student of configs/distill_tiny.py, on one device:
  plain LM step         moejax.train.Experiment on the same domain batches (no teachers)
  cohost, 4 teachers    the distillation step with the 4 dense specialists in the step
  cache, 4 teachers     the step reading each row's teacher hidden state from the batch
Teachers are untrained (timing does not depend on their weights). The variants
take turns (``--rounds``) so load from other jobs falls on all alike.
"""

import argparse
import copy
import statistics
import tempfile

import jax

from benchmarks import train_step
from moejax.config import load_config
from moejax.distill import cache as cache_lib
from moejax.distill.data import DomainBatches
from moejax.distill.run import DistillExperiment
from moejax.train import Experiment
from tests.distill.helpers import random_teachers


class Variant(train_step.Variant):
  """``benchmarks/train_step.py``'s timed variant around a prebuilt experiment and iterator."""

  def __init__(self, exp, data):
    self.exp, self.data = exp, data
    self.state = exp.init_state()
    self.time_steps(2)  # compile + warm up


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=4)
  args = parser.parse_args()
  cfg = load_config("configs/distill_tiny.py")
  devices = jax.devices()[:1]
  teachers = random_teachers(cfg, widths=[cfg.model.d_model] * len(cfg.distill.domains))
  cached_cfg = copy.deepcopy(cfg)
  cached_cfg.unlock()
  cached_cfg.distill.update(teacher_source="cache", cache_batches=args.steps + 2)
  cache_dir = tempfile.mkdtemp()
  cache_lib.write_cache(cached_cfg, teachers, cache_dir, devices)
  plain = Experiment(cfg, devices)
  variants = {
      "plain LM step": Variant(plain, DomainBatches(cfg, split="train", seed=0)),
      "cohost, 4 teachers": Variant(DistillExperiment(cfg, teachers, devices), DomainBatches(cfg, split="train", seed=0)),
      "cache, 4 teachers": Variant(DistillExperiment(cached_cfg, teachers, devices, cache_dir),
                                   cache_lib.CachedBatches(cache_dir)),
  }
  times = {name: [] for name in variants}
  per_round = max(1, args.steps // args.rounds)
  for _ in range(args.rounds):
    for name, v in variants.items():
      times[name] += v.time_steps(per_round)
  base = statistics.median(times["plain LM step"])
  print(f"| variant | median step (ms) | ratio to plain |\n|---|---|---|")
  for name, t in times.items():
    print(f"| {name} | {1000 * statistics.median(t):.1f} | {statistics.median(t) / base:.2f} |")


if __name__ == "__main__":
  main()
