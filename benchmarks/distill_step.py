"""Student step time with distillation (configs/distill_tiny.py), as ratios to plain LM training.

  python benchmarks/distill_step.py [--rounds 12]

Variants, all on the student of configs/distill_tiny.py, on one device:
  plain LM step         moejax.train.Experiment on the same domain batches (no teachers)
  cohost, 4 teachers    the distillation step with the 4 dense specialists in the step
  cache, 4 teachers     the step reading each row's teacher hidden state from the batch
Teachers are untrained (timing does not depend on their weights). The variants
take turns (one step each per round, the order rotating) so load from other jobs
falls on all alike. Raw samples and provenance go to ``benchmarks/results/distill_step/``.
"""

import argparse
import copy
import os
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, for benchmarks.*
from benchmarks import train_step  # noqa: E402
from moejax.benchmarking import Results, interleaved, summary
from moejax.config import load_config
from moejax.distill import cache as cache_lib
from moejax.distill.data import DomainBatches
from moejax.distill.run import DistillExperiment
from moejax.train import Experiment
from tests.distill.helpers import random_teachers


class Variant(train_step.Variant):
  """``benchmarks/train_step.py``'s timed variant around a prebuilt experiment and iterator."""

  def __init__(self, exp, data):
    self.start(exp, data)


def table(record: dict) -> str:
  """Markdown: one row per variant (``benchmarks/report.py``)."""
  lines = ["| variant | median step ms (quartiles) | ratio to plain (per-round range) |", "|---|---|---|"]
  for r in record["rows"]:
    lines.append(f"| {r['variant']} | {r['median_s'] * 1e3:.1f} ({r['q1_s'] * 1e3:.0f}-{r['q3_s'] * 1e3:.0f}) | "
                 f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=12)
  args = parser.parse_args()
  results = Results("distill_step", params={"config": "configs/distill_tiny.py", "rounds": args.rounds})
  cfg = load_config("configs/distill_tiny.py")
  devices = jax.devices()[:1]
  teachers = random_teachers(cfg, widths=[cfg.model.d_model] * len(cfg.distill.domains))
  cached_cfg = copy.deepcopy(cfg)
  cached_cfg.unlock()
  cached_cfg.distill.update(teacher_source="cache", cache_batches=args.rounds + 2)
  cache_dir = tempfile.mkdtemp()
  cache_lib.write_cache(cached_cfg, teachers, cache_dir, devices)
  plain = Experiment(cfg, devices)
  variants = {
      "plain LM step": Variant(plain, DomainBatches(cfg, split="train", seed=0)),
      "cohost, 4 teachers": Variant(DistillExperiment(cfg, teachers, devices), DomainBatches(cfg, split="train", seed=0)),
      "cache, 4 teachers": Variant(DistillExperiment(cached_cfg, teachers, devices, cache_dir),
                                   cache_lib.CachedBatches(cache_dir)),
  }
  samples = interleaved({name: v.step for name, v in variants.items()}, args.rounds)
  results.add_rows([{"variant": n, **summary(s, samples["plain LM step"])} for n, s in samples.items()],
                   tokens_per_step=cfg.train.batch_size * cfg.data.seq_len)
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  main()
