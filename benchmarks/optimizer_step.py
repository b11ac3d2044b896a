"""Train-step time of Muon (and peers) vs AdamW on the same model, as ratios.

  python benchmarks/optimizer_step.py [--preset tiny|medium|small] [--rounds 12] [--variants adamw,muon]

Presets: ``tiny`` (configs/tiny.py, 0.9M params, 16 x 256 tokens), ``medium``
(6 layers, d=384, ~10M params, 8 x 256; CPU-feasible), ``small``
(configs/small.py, ~126M params, its 64 x 2048 tokens in 4 micro-batches,
bf16; the GPU target: Muon <= 1.15x AdamW). All variants are compiled first, then timed *interleaved*
(one step of each variant per round, the order rotating), so load from
other jobs on a shared machine hits every variant alike; medians over
rounds with quartiles, ratios to AdamW's with the spread of the per-round ratios.
Two numbers per variant: the whole train step, and the optimizer update alone
(``tx.update`` jitted on its own). Raw samples and provenance go to
``benchmarks/results/optimizer_step/``.
"""

import argparse
import time

import jax

from moejax.benchmarking import Results, interleaved, summary
from moejax.config import load_config
from moejax.config_apply import apply_config
from moejax.train import Experiment

PRESETS = {
    "tiny": ("configs/tiny.py", {}),
    "medium": ("configs/tiny.py", {"model.num_layers": 6, "model.d_model": 384, "model.num_heads": 6,
                                   "model.num_kv_heads": 2, "model.ffn_dim": 1024, "train.batch_size": 8}),
    "small": ("configs/small.py", {"train.grad_accum_steps": 4}),
}

VARIANTS = {
    "adamw": {"optim.name": "adamw"},
    "muon (bf16 NS)": {"optim.name": "muon", "optim.muon.ns_dtype": "bfloat16"},
    "muon (fp32 NS)": {"optim.name": "muon", "optim.muon.ns_dtype": "float32"},
    "muon polar_express": {"optim.name": "muon", "optim.muon.coefficients": "polar_express"},
    "muon normuon": {"optim.name": "muon", "optim.muon.normuon": True},
    "optax_muon": {"optim.name": "optax_muon"},
    "lion": {"optim.name": "lion"},
}


class Variant:
  """A compiled train step and optimizer update for one config, ready to time."""

  def __init__(self, config: str, overrides: dict):
    cfg = load_config(config)
    with cfg.unlocked():
      apply_config(cfg, overrides)
    self.exp = Experiment(cfg, jax.devices()[:1])
    self.state, data = self.exp.init_state(), self.exp.data_iterator("train")
    self.batch = next(data)
    with self.exp._context():
      self.update = jax.jit(lambda g, s, p: self.exp.tx.update(g, s, p))
    for _ in range(2):  # compile + warm up
      self.step()
      self.opt_update()

  def step(self):
    start = time.perf_counter()
    self.state, metrics = self.exp.train_step(self.state, self.batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  def opt_update(self):
    with self.exp._context():
      start = time.perf_counter()
      jax.block_until_ready(self.update(self.state.params, self.state.opt_state, self.state.params))
    return time.perf_counter() - start


def table(record: dict) -> str:
  """Markdown: step and update time per variant (``benchmarks/report.py``)."""
  rows = {r["variant"]: r for r in record["rows"]}
  fmt = lambda r: (f"{r['median_s'] * 1e3:.1f} ({r['q1_s'] * 1e3:.0f}-{r['q3_s'] * 1e3:.0f}) | "
                   f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
  lines = ["| variant | step ms (quartiles) | step ratio (per-round range) | update ms (quartiles) | "
           "update ratio (per-round range) |", "|---|---|---|---|---|"]
  for name in record["variants"]:
    lines.append(f"| {name} | {fmt(rows[name + ' step'])} | {fmt(rows[name + ' update'])} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (adamw first)")
  args = parser.parse_args()
  config, base = PRESETS[args.preset]
  names = args.variants.split(",")
  results = Results("optimizer_step", params={"preset": args.preset, "variants": names, "rounds": args.rounds})
  variants = {name: Variant(config, {**base, **VARIANTS[name]}) for name in names}
  cfg = variants[names[0]].exp.cfg
  params = sum(x.size for x in jax.tree.leaves(variants[names[0]].state.params))
  print(f"preset {args.preset}: {config} {base}: {params / 1e6:.1f}M params, "
        f"{cfg.train.batch_size} x {cfg.data.seq_len} tokens, {jax.devices()[0].platform}, "
        f"{args.rounds} interleaved rounds")
  timers = {}
  for name, v in variants.items():
    timers[f"{name} step"], timers[f"{name} update"] = v.step, v.opt_update
  samples = interleaved(timers, args.rounds)
  results.add_rows([{"variant": key, **summary(s, samples[f"{names[0]} {key.rsplit(' ', 1)[1]}"])}
                    for key, s in samples.items()], variants=names, params_millions=params / 1e6,
                   tokens_per_step=cfg.train.batch_size * cfg.data.seq_len)
  results.write()
  print(table(results.record))


if __name__ == "__main__":
  main()
