"""Input-pipeline throughput (array_record shards, 0/2/4 grain workers) vs the train step's consumption.

  python benchmarks/data_pipeline.py [--config configs/tiny.py] [--workers 0,2,4] [--batches 200]
      [--corpus-mb 24] [--mixture] [--out benchmarks/results/data_pipeline.json]

Writes a synthetic JSONL corpus (random words) into a temporary directory, prepares it
with ``moejax.data.prepare`` (timed), then for each worker count times ``--batches``
global batches of the config's ``train.batch_size x data.seq_len`` from ``ShardedBatches``
(after one warm-up batch, which includes starting the workers), and times the config's
train step on one device for comparison. ``--mixture`` reads the corpus as a 3-source
mixture (the same shards under three names). Prints a table and writes the raw numbers
with the commit, date, machine and command to ``--out``.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from moejax.config import load_config
from moejax.validation import validate
from moejax.data import ShardedBatches
from moejax.data.prepare import prepare
from moejax.train import Experiment

WORDS = ["def", "return", "self", "the", "of", "import", "numpy", "x", "=", "(", ")", "for", "in", "range",
         "model", "data", "token", "expert", "router", "attention", "λ", "é"]


def write_corpus(directory: str, megabytes: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  target, written, part = megabytes * 2**20, 0, 0
  while written < target:
    with open(os.path.join(directory, f"part{part:03d}.jsonl"), "w") as f:
      for _ in range(2000):
        line = json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(50, 1500)))}) + "\n"
        f.write(line)
        written += len(line)
    part += 1


def time_pipeline(cfg, batches: int) -> dict:
  data = ShardedBatches(cfg.data, split="train", global_batch=cfg.train.batch_size, seed=cfg.seed,
                        num_shards=cfg.data.shards)
  start = time.perf_counter()
  next(data)
  first = time.perf_counter() - start
  start, real = time.perf_counter(), 0
  for _ in range(batches):
    real += int((next(data)["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - start
  data.close()
  tokens = batches * cfg.train.batch_size * cfg.data.seq_len
  return {"first_batch_s": first, "seconds": seconds, "batches": batches, "tokens_per_s": tokens / seconds,
          "non_padding_fraction": real / tokens}


def time_train_step(cfg, steps: int) -> dict:
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
  step = statistics.median(times)
  return {"median_step_s": step, "steps": steps,
          "tokens_per_s": cfg.train.batch_size * cfg.data.seq_len / step}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--workers", default="0,2,4")
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--train-steps", type=int, default=10)
  parser.add_argument("--corpus-mb", type=int, default=24)
  parser.add_argument("--mixture", action="store_true")
  parser.add_argument("--out", default="benchmarks/results/data_pipeline.json")
  args = parser.parse_args()
  cfg = load_config(args.config)
  result = {"command": "python " + " ".join(sys.argv),
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(jax.devices()[0]),
                        "load_average_at_start": os.getloadavg()},
            "config": args.config, "batch": [cfg.train.batch_size, cfg.data.seq_len]}
  with tempfile.TemporaryDirectory() as tmp:
    write_corpus(os.path.join(tmp), args.corpus_mb)
    start = time.perf_counter()
    manifest = prepare([os.path.join(tmp, "*.jsonl")], cfg.data.tokenizer, os.path.join(tmp, "shards"),
                       show_progress=False)
    seconds = time.perf_counter() - start
    tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["validation"]["tokens"]
    result["prepare"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "workers": 0}
    with cfg.unlocked():
      cfg.data.source, cfg.data.path, cfg.train.eval_every = "array_record", os.path.join(tmp, "shards"), 0
      if args.mixture:
        os.makedirs(os.path.join(tmp, "mix"))
        for name in ("web", "code", "math"):
          os.symlink(os.path.join(tmp, "shards"), os.path.join(tmp, "mix", name))
        cfg.data.path, cfg.data.mixture = os.path.join(tmp, "mix"), "web=0.6,code=0.3,math=0.1"
    validate(cfg)
    result["pipeline"] = {}
    for workers in map(int, args.workers.split(",")):
      with cfg.unlocked():
        cfg.data.workers = workers
      result["pipeline"][workers] = time_pipeline(cfg, args.batches)
    with cfg.unlocked():
      cfg.data.workers = 0
    result["train_step"] = time_train_step(cfg, args.train_steps)
  result["machine"]["load_average_at_end"] = os.getloadavg()
  print(f"{args.config}: batch {cfg.train.batch_size} x {cfg.data.seq_len}, {result['machine']['device']}, "
        f"load average {result['machine']['load_average_at_start'][0]:.1f} on {os.cpu_count()} CPUs")
  print(f"prepare: {result['prepare']['tokens_per_s']:,.0f} tokens/s (1 process)")
  train_rate = result["train_step"]["tokens_per_s"]
  print(f"{'reader':<24}{'tokens/s':>12}{'x train step':>14}{'first batch s':>15}")
  for workers, r in result["pipeline"].items():
    print(f"{f'pipeline, {workers} workers':<24}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s'] / train_rate:>14.1f}"
          f"{r['first_batch_s']:>15.1f}")
  print(f"{'train step (1 device)':<24}{train_rate:>12,.0f}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
