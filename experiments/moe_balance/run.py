"""Expert load with and without the auxiliary-loss-free balancing bias.

  python experiments/moe_balance/run.py [--steps 200] [--workdir workdirs/moe_balance]

Trains configs/tiny_moe.py three times on the stdlib bytes (batch 8 x 128,
about two minutes a run on 2 CPU cores): ``v3`` (sigmoid routing with the
DeepSeek-V3 bias, bias_update_rate 0.01), ``v3_rate1e-3`` (DeepSeek-V3's rate
0.001) and ``no_bias`` (no bias, no balance loss either); a run whose
``metrics.jsonl`` exists is not repeated. Reads the ``metrics.jsonl`` files and writes
``load.png`` (per-expert load / mean of every MoE layer over steps) and
``summary.md`` (the numbers quoted in README.md) next to this script.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax.config import load_config  # noqa: E402
from moejax.train import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "..", "configs", "tiny_moe.py")
# name -> (configs/tiny_moe.py recipe, model.moe overrides, description)
VARIANTS = {
    "v3": ("v3", {}, "aux-free bias, rate 0.01"),
    "v3_rate1e-3": ("v3", {"bias_update_rate": 0.001}, "aux-free bias, rate 0.001 (DeepSeek-V3's)"),
    "no_bias": ("no_bias", {}, "no balancing at all"),
}


def run(variant: str, steps: int, workdir: str) -> list[dict]:
  recipe, overrides, _ = VARIANTS[variant]
  cfg = load_config(f"{CONFIG}:{recipe}")
  with cfg.unlocked():
    cfg.model.moe.update(overrides)
    cfg.data.seq_len = 128
    cfg.train.update(steps=steps, batch_size=8, log_every=5, eval_every=steps, eval_batches=4,
                     checkpoint_every=steps)
  path = os.path.join(workdir, variant)
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
  fig.suptitle("Per-expert load (each line one of 16 experts; 1 = balanced), tiny_moe")
  fig.tight_layout()
  fig.savefig(out, dpi=110)


def summary(records: dict[str, list[dict]]) -> str:
  lines = ["| run | step | train loss | eval loss | max/mean load (layers 1-3) | min/mean load "
           "| experts < 1% of mean |", "|---|---|---|---|---|---|---|"]
  for variant, recs in records.items():
    last = [r for r in recs if "layer_1/mlp/expert_load" in r][-1]
    evals = [r for r in recs if "eval_loss" in r]
    layers = sorted({k.split("/")[0] for k in last if k.endswith("/expert_load")})
    fmt = lambda key: " / ".join(f"{last[f'{layer}/mlp/{key}']:.2f}" for layer in layers)
    starved = sum(int(np.sum(np.array(last[f"{layer}/mlp/expert_load"]) < 0.01)) for layer in layers)
    eval_loss = f"{evals[-1]['eval_loss']:.3f}" if evals else "-"
    lines.append(f"| {variant} ({VARIANTS[variant][2]}) | {last['step']} | {last['loss']:.3f} | {eval_loss} | "
                 f"{fmt('load_max_over_mean')} | {fmt('load_min_over_mean')} | {starved} of {16 * len(layers)} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--workdir", default="workdirs/moe_balance")
  args = parser.parse_args()
  records = {variant: run(variant, args.steps, args.workdir) for variant in VARIANTS}
  plot(records, os.path.join(HERE, "load.png"))
  table = summary(records)
  with open(os.path.join(HERE, "summary.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
