"""Passkey retrieval beyond the training length: dense vs sliding vs DSA vs DeepSeek-V4 hybrid.

  python experiments/long_context/run.py [--steps 500] [--train-len 128] [--workdir workdirs/long_context]
  python experiments/long_context/run.py --from-results   # heatmaps.png + summary.md from results.json

Trains four tiny models (configs/tiny_hybrid.py widths: d=128, 4 heads / 2 kv
heads, 4 layers, window 64, Muon) that differ only in their attention schedule on
the passkey task at ``--train-len`` tokens, then evaluates each
(``moejax.evals.long_context``, the same code as ``moejax eval --task
passkey``) at 1x, 2x, 4x and 8x the training length with the key at depths
0 .. 1: as trained, and with YaRN (``model.attention.yarn`` and
``compress_yarn``, factor = length / training length, no fine-tuning). A
run whose checkpoint exists is not trained again. Writes ``heatmaps.png``
(exact-key accuracy, depth x length; top row as trained, bottom row with
YaRN), ``results.json`` and ``summary.md`` to ``--out`` (default: next to
this script), and each run's per-step metrics to ``results/<variant>.jsonl.gz``
(with ``results/meta.json``: commit, date, command). ``--from-results``
rebuilds the plot and the table from ``results.json`` without training.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moejax import results_io  # noqa: E402
from moejax.config import load_config  # noqa: E402
from moejax.evals import long_context  # noqa: E402
from moejax.train import load_checkpoint, train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "..", "configs", "tiny_hybrid.py")
# name -> (configs/tiny_hybrid.py variant, the 4-layer attention schedule)
VARIANTS = {
    "dense": ("sliding,passkey", ("dense",) * 4),
    "sliding": ("sliding,passkey", ("sliding",) * 4),
    "dsa": ("dsa,passkey", ("dsa",) * 4),
    "v4": ("v4,passkey", ("swa", "csa", "hca", "csa")),  # configs/v4_1m.py's pattern
}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def config(variant: str, steps: int, train_len: int):
  recipe, schedule = VARIANTS[variant]
  cfg = load_config(f"{CONFIG}:{recipe}")
  with cfg.unlocked():
    cfg.model.update(num_layers=len(schedule), attention_types=schedule)
    cfg.data.update(seq_len=train_len, task_length=train_len)
    cfg.train.update(steps=steps, batch_size=16, log_every=20, eval_every=steps, eval_batches=4,
                     checkpoint_every=steps)
    # Muon for every schedule: with AdamW at this rate the V4 layers stay at chance (README).
    cfg.optim.update(name="muon", learning_rate=3e-3)
  return cfg


def with_yarn(cfg, factor: int, train_len: int):
  """``cfg`` with YaRN (main and compressed rope) stretching ``train_len`` by ``factor``."""
  cfg = cfg.copy_and_resolve_references()
  for yarn in (cfg.model.attention.yarn, cfg.model.attention.compress_yarn):
    yarn.update(factor=float(factor), original_max_len=train_len)
  return cfg


def run(variant: str, steps: int, train_len: int, samples: int, workdir: str) -> list[dict]:
  """Trains ``variant`` (unless done) and returns its results as trained and with YaRN."""
  cfg = config(variant, steps, train_len)
  path = os.path.join(workdir, variant)
  if not os.path.exists(os.path.join(path, "checkpoints", str(steps))):
    train(cfg, path)
  with open(os.path.join(path, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  results_io.save_arm(os.path.join(HERE, "results"), variant, records)
  train_loss = [r["loss"] for r in records if "loss" in r]
  factors = (1, 2, 4, 8)

  def grid(run_cfg, ks):
    exp, step, state = load_checkpoint(run_cfg, path)
    return step, long_context.retrieval_grid(exp, state, "passkey", [train_len * k for k in ks], list(DEPTHS),
                                             samples, seed=cfg.seed)

  step, plain = grid(cfg, factors)
  yarn = [r for r in plain if r["length"] == train_len]  # factor 1: YaRN is off
  for k in factors[1:]:
    yarn += grid(with_yarn(cfg, k, train_len), [k])[1]
  results = []
  for name, rows, report in ((variant, plain, "passkey"), (f"{variant}+yarn", yarn, "passkey_yarn")):
    long_context.write_report(rows, os.path.join(path, "evals"), report)
    results.append({"variant": name, "schedule": list(VARIANTS[variant][1]), "step": step,
                    "train_loss_first": train_loss[0], "train_loss_last": train_loss[-1], "rows": rows})
  return results


def plot(results: list[dict], out: str) -> None:
  cols = len(results) // 2  # as trained (top row), with YaRN (bottom row)
  fig, axes = plt.subplots(2, cols, figsize=(3.6 * cols, 6.6), sharey=True, squeeze=False)
  for ax, res in zip(axes.T.ravel(), results):
    im = long_context.heatmap_panel(ax, res["rows"], fontsize=7)
    ax.set_title(f"{res['variant']}", fontsize=10)
  for ax in axes[-1]:
    ax.set_xlabel("context length (tokens)")
  for ax in axes[:, 0]:
    ax.set_ylabel("key depth")
  fig.colorbar(im, ax=axes, label="exact-key accuracy", shrink=0.9)
  fig.suptitle(f"Passkey retrieval, trained at {results[0]['rows'][0]['length']} tokens", fontsize=11)
  fig.savefig(out, dpi=110, bbox_inches="tight")


def summary(results: list[dict]) -> str:
  lengths = sorted({r["length"] for r in results[0]["rows"]})
  head = " | ".join(f"{n}: key / digit" for n in lengths)
  lines = [f"| schedule | train loss (first -> last) | {head} |", "|---|---|" + "---|" * len(lengths)]
  for res in results:
    cells = []
    for n in lengths:
      rows = [r for r in res["rows"] if r["length"] == n]
      cells.append(f"{np.mean([r['accuracy'] for r in rows]):.2f} / {np.mean([r['token_accuracy'] for r in rows]):.2f}")
    lines.append(f"| {res['variant']} ({', '.join(res['schedule'])}) | {res['train_loss_first']:.3f} -> "
                 f"{res['train_loss_last']:.3f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--train-len", type=int, default=128)
  parser.add_argument("--samples", type=int, default=16, help="examples per (length, depth) cell")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--workdir", default="workdirs/long_context")
  parser.add_argument("--out", default=HERE, help="where results.json, heatmaps.png and summary.md go")
  parser.add_argument("--from-results", action="store_true", help="no training: plot and tabulate results.json")
  parser.add_argument("--results", default=os.path.join(HERE, "results.json"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.from_results:
    with open(args.results) as f:
      results = json.load(f)
  else:
    code_commit = results_io.commit()
    results = [r for v in args.variants.split(",") for r in run(v, args.steps, args.train_len, args.samples,
                                                                  args.workdir)]
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    results_io.save_meta(os.path.join(HERE, "results"), {"steps": args.steps, "train_len": args.train_len,
                                                         "samples": args.samples, "variants": args.variants},
                         code_commit)
  plot(results, os.path.join(args.out, "heatmaps.png"))
  table = summary(results)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
