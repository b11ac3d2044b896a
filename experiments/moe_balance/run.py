"""Expert load with and without the auxiliary-loss-free balancing bias.

  python experiments/moe_balance/run.py [--steps 200] [--seeds 0,1,2] [--workdir workdirs/moe_balance]
  python experiments/moe_balance/run.py --from-results   # plots and tables from results/, no training

Trains configs/tiny_moe.py on the stdlib bytes (batch 8 x 128, about two
minutes a run on 2 idle CPU cores) for each seed and each arm: ``v3`` (sigmoid
routing with the DeepSeek-V3 bias, bias_update_rate 0.01), ``v3_rate1e-3``
(DeepSeek-V3's rate 0.001) and ``no_bias`` (no bias, no balance loss either);
a run whose ``metrics.jsonl`` exists is not repeated. Stores each run's metrics
as ``results/<arm>_seed<n>.jsonl.gz`` (with ``results/meta.json``: commit, date,
command), then writes ``load.png`` (per-expert load / mean of every MoE layer
over steps, seed 0) and ``summary.md`` (the numbers quoted in README.md) next
to this script. ``--from-results`` skips training and reads ``results/``.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax import results_io  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
CONFIG = os.path.join(HERE, "..", "..", "configs", "tiny_moe.py")
# name -> (configs/tiny_moe.py recipe, model.moe overrides, description)
VARIANTS = {
  "v3": ("v3", {}, "aux-free bias, rate 0.01"),
  "v3_rate1e-3": ("v3", {"bias_update_rate": 0.001}, "aux-free bias, rate 0.001 (DeepSeek-V3's)"),
  "no_bias": ("no_bias", {}, "no balancing at all"),
}


def run(variant: str, seed: int, steps: int, workdir: str) -> list[dict]:
  from moejax.config import load_config
  from moejax.train import train

  recipe, overrides, _ = VARIANTS[variant]
  cfg = load_config(f"{CONFIG}:{recipe}")
  with cfg.unlocked():
    cfg.seed = seed
    cfg.model.moe.update(overrides)
    cfg.data.seq_len = 128
    cfg.train.update(steps=steps, batch_size=8, log_every=5, eval_every=steps, eval_batches=4,
                     checkpoint_every=steps)
  path = os.path.join(workdir, f"{variant}_seed{seed}")
  if not os.path.exists(os.path.join(path, "metrics.jsonl")):
    train(cfg, path)
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def plot(records: dict[str, list[dict]], out: str) -> None:
  layers = sorted({k.split("/")[0] for r in next(iter(records.values())) for k in r if k.endswith("/expert_load")})
  fig, axes = plt.subplots(len(records), len(layers), figsize=(4.2 * len(layers), 3.2 * len(records)),
                           sharex=True, sharey=True, squeeze=False)
  for row, (variant, recs) in enumerate(records.items()):
    recs = [r for r in recs if f"{layers[0]}/mlp/expert_load" in r]
    steps = [r["step"] for r in recs]
    for col, layer in enumerate(layers):
      ax = axes[row][col]
      loads = np.array([r[f"{layer}/mlp/expert_load"] for r in recs])  # [steps, E]
      ax.plot(steps, loads, lw=0.8, alpha=0.8)
      ax.axhline(1.0, color="k", lw=0.8, ls="--")
      ax.set_title(f"{variant}: {layer}", fontsize=9)
      ax.set_yscale("symlog", linthresh=0.1)
      if col == 0:
        ax.set_ylabel("expert load / mean")
      if row == len(records) - 1:
        ax.set_xlabel("step")
  fig.suptitle("Per-expert load (each line one of 16 experts; 1 = balanced), tiny_moe, seed 0")
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def final(recs: list[dict]) -> dict:
  """Train loss, eval loss and load statistics at the last logged step of one run."""
  last = [r for r in recs if "layer_1/mlp/expert_load" in r][-1]
  evals = [r for r in recs if "eval_loss" in r]
  layers = sorted({k.split("/")[0] for k in last if k.endswith("/expert_load")})
  return {
    "step": last["step"], "loss": last["loss"], "eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
    "max_load": [last[f"{layer}/mlp/load_max_over_mean"] for layer in layers],
    "min_load": [last[f"{layer}/mlp/load_min_over_mean"] for layer in layers],
    "starved": sum(int(np.sum(np.array(last[f"{layer}/mlp/expert_load"]) < 0.01)) for layer in layers),
    "experts": 16 * len(layers),
  }


def summary(runs: dict[str, dict[int, list[dict]]]) -> str:
  """Per-run rows, then per-arm mean and range over seeds, then the loss comparison it supports."""
  lines = ["| run | seed | step | train loss | eval loss | max/mean load (layers 1-3) | min/mean load "
           "| experts < 1% of mean |", "|---|---|---|---|---|---|---|---|"]
  evals = {}
  for variant, seeds in runs.items():
    for seed, recs in sorted(seeds.items()):
      f = final(recs)
      evals.setdefault(variant, []).append(f["eval_loss"])
      lines.append(f"| {variant} ({VARIANTS[variant][2]}) | {seed} | {f['step']} | {f['loss']:.3f} | "
                   f"{f['eval_loss']:.3f} | {' / '.join(f'{x:.2f}' for x in f['max_load'])} | "
                   f"{' / '.join(f'{x:.2f}' for x in f['min_load'])} | {f['starved']} of {f['experts']} |")
  lines += ["", "| arm | seeds | eval loss mean | eval loss min - max |", "|---|---|---|---|"]
  for variant, values in evals.items():
    lines.append(f"| {variant} | {len(values)} | {np.mean(values):.3f} | {min(values):.3f} - {max(values):.3f} |")
  lines.append("")
  names = list(evals)
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      lo, hi = (a, b) if np.mean(evals[a]) < np.mean(evals[b]) else (b, a)
      separated = max(evals[lo]) < min(evals[hi])
      if min(len(evals[lo]), len(evals[hi])) < 3:
        verdict = "fewer than 3 seeds in an arm: no loss difference is claimed"
      elif separated:
        verdict = "every seed of the first is below every seed of the second"
      else:
        verdict = "the seed ranges overlap: no loss difference is claimed"
      lines.append(f"- {lo} vs {hi}: mean eval loss {np.mean(evals[lo]):.3f} vs {np.mean(evals[hi]):.3f}; {verdict}")
  return "\n".join(lines) + "\n"


def report(runs: dict[str, dict[int, list[dict]]], out_dir: str) -> str:
  """Writes ``load.png`` and ``summary.md`` into ``out_dir``; returns the summary."""
  plot({variant: seeds[min(seeds)] for variant, seeds in runs.items()}, os.path.join(out_dir, "load.png"))
  table = summary(runs)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(table)
  return table


def load_results(results_dir: str) -> dict[str, dict[int, list[dict]]]:
  """{arm: {seed: records}} for every stored run of the seeds meta.json lists (a run not finished is absent)."""
  seeds = results_io.load_meta(results_dir)["setup"]["seeds"]
  stored = lambda v, s: os.path.exists(os.path.join(results_dir, f"{v}_seed{s}.jsonl.gz"))
  runs = {v: {s: results_io.load_arm(results_dir, f"{v}_seed{s}") for s in seeds if stored(v, s)} for v in VARIANTS}
  return {v: seeds_of_v for v, seeds_of_v in runs.items() if seeds_of_v}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, each run for every arm")
  parser.add_argument("--workdir", default="workdirs/moe_balance")
  parser.add_argument("--from-results", action="store_true", help="no training: report from results/")
  parser.add_argument("--results", default=RESULTS, help="directory of the stored metrics")
  parser.add_argument("--out", default=HERE, help="where load.png and summary.md go")
  args = parser.parse_args()
  if not args.from_results:
    seeds = [int(s) for s in args.seeds.split(",")]
    results_io.save_meta(args.results, {"steps": args.steps, "seeds": seeds, "config": "configs/tiny_moe.py",
                                        "batch": "8 x 128", "arms": {k: v[2] for k, v in VARIANTS.items()}})
    for seed in seeds:
      for variant in VARIANTS:
        results_io.save_arm(args.results, f"{variant}_seed{seed}", run(variant, seed, args.steps, args.workdir))
  print(report(load_results(args.results), args.out))


if __name__ == "__main__":
  main()
