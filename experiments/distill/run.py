"""Four specialists -> one MoE student, against two controls at the same token budget.

  PYTHONPATH=. python experiments/distill/run.py --workdir workdirs/exp_distill
  PYTHONPATH=. python experiments/distill/run.py --from-results   # summary.md + heatmaps from results.json

Arms (all: configs/distill_tiny.py's MoE student, 200 steps x 8 rows x 128 tokens):
  distilled   0.5 * CE + 0.5 * KL to each domain's specialist (4 specialists, 150 steps each)
  labels      alpha = 1: the same student on labels only (KL to the specialists only measured)
  generalist  0.5 * CE + 0.5 * KL to one dense generalist trained on the union of the domains
              for 4 x 150 = 600 steps (the specialists' total), with the same per-domain mixture
Writes results.json (per-domain validation CE / KL and domain -> expert shares of every arm),
results/<arm>.jsonl.gz (each arm's per-step metrics, with results/meta.json: commit, date, command), and
summary.md with the heatmaps (experts_<arm>.png) next to this file. ``--from-results`` rebuilds summary.md and
the heatmaps from results.json alone, without training.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

from moejax import results_io

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ("distilled", "labels", "generalist")


def with_teachers(cfg, teacher_workdirs: dict[str, str], **distill_fields):
  cfg = copy.deepcopy(cfg)
  cfg.unlock()
  for name, workdir in teacher_workdirs.items():
    cfg.distill.domains[name].teacher_workdir = workdir
  cfg.distill.update(distill_fields)
  return cfg


def train_arms(workdir: str) -> tuple[dict, dict, str]:
  """Trains the three arms; returns (results as stored in results.json, wall times, results_io commit)."""
  from moejax.config import load_config
  from moejax.distill.run import run_distill

  code_commit = results_io.commit()
  base = load_config("configs/distill_tiny.py")
  names = list(base.distill.domains)
  results, times = {}, {}

  start = time.time()
  distilled_dir = os.path.join(workdir, "distilled")
  results["distilled"] = run_distill(base, distilled_dir)
  times["distilled (incl. 4 specialists)"] = time.time() - start
  specialists = {n: os.path.join(distilled_dir, "teachers", n) for n in names}

  start = time.time()
  results["labels"] = run_distill(with_teachers(base, specialists, alpha=1.0), os.path.join(workdir, "labels"))
  times["labels"] = time.time() - start

  start = time.time()
  generalist_cfg = with_teachers(base, specialists, alpha=1.0)
  generalist_cfg.model.mlp_types = ("dense",)
  generalist_cfg.train.steps = base.distill.teacher_steps * len(names)
  generalist_cfg.train.eval_every = generalist_cfg.train.steps
  generalist_dir = os.path.join(workdir, "generalist_teacher")
  run_distill(generalist_cfg, generalist_dir)
  results["generalist"] = run_distill(with_teachers(base, {n: generalist_dir for n in names}),
                                      os.path.join(workdir, "generalist"))
  times["generalist (incl. its teacher)"] = time.time() - start
  for arm in ARMS:
    with open(os.path.join(workdir, arm, "metrics.jsonl")) as f:
      results_io.save_arm(os.path.join(HERE, "results"), arm, [json.loads(line) for line in f])
  return ({a: {"domains": r["domains"], "experts": {k: np.asarray(v).tolist() for k, v in r["experts"].items()}}
           for a, r in results.items()}, times, code_commit)


def report(results: dict, out: str, times: dict | None = None, command: str = "") -> str:
  """summary.md and experts_<arm>.png in ``out`` from results.json's content; returns the summary."""
  from moejax.distill.report import plot_heatmap

  names = list(results["distilled"]["domains"])
  lines = ["# Distillation experiment: results", "",
           f"`{command}`.", "",
           "Validation CE of the student per domain (nats/token; lower is better), its KL to the arm's "
           "teacher(s), and the specialist's own CE for reference:", "",
           "| domain | distilled CE | labels-only CE | generalist-distilled CE | specialist CE | "
           "distilled KL | labels-only KL (to specialist) | generalist KL (to generalist) | generalist CE |",
           "|---|---|---|---|---|---|---|---|---|"]
  for n in names:
    d, l, g = (results[a]["domains"][n] for a in ("distilled", "labels", "generalist"))
    lines.append(f"| {n} | {d['student_ce']:.3f} | {l['student_ce']:.3f} | {g['student_ce']:.3f} | "
                 f"{d['teacher_ce']:.3f} | {d['kl_to_teacher']:.3f} | {l['kl_to_teacher']:.3f} | "
                 f"{g['kl_to_teacher']:.3f} | {g['teacher_ce']:.3f} |")
  mean = lambda arm: sum(results[arm]["domains"][n]["student_ce"] for n in names) / len(names)
  lines += [f"| **mean** | {mean('distilled'):.3f} | {mean('labels'):.3f} | {mean('generalist'):.3f} | | | | | |", ""]
  if times:
    lines += ["Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + ".", ""]
  for arm in ARMS:
    for layer, share in results[arm]["experts"].items():
      png = f"experts_{arm}.png"
      plot_heatmap(np.asarray(share), names, f"{arm}: domain -> expert share ({layer})", os.path.join(out, png))
      lines += [f"## {arm}: domain -> expert share ({layer})", "", f"![{arm}]({png})", "",
                "| domain | " + " | ".join(str(i) for i in range(len(share[0]))) + " |",
                "|---|" + "---|" * len(share[0])]
      lines += [f"| {n} | " + " | ".join(f"{x:.2f}" for x in row) + " |" for n, row in zip(names, share)]
      lines.append("")
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines))
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default="workdirs/exp_distill")
  parser.add_argument("--from-results", action="store_true", help="no training: report from results.json")
  parser.add_argument("--results", default=os.path.join(HERE, "results.json"))
  parser.add_argument("--out", default=HERE, help="where summary.md and the heatmaps go")
  args = parser.parse_args()
  if args.from_results:
    with open(args.results) as f:
      results = json.load(f)
    command = "PYTHONPATH=. python experiments/distill/run.py --from-results` (tables regenerated from `results.json"
    print(report(results, args.out, command=command), file=sys.stderr)
    return
  results, times, code_commit = train_arms(args.workdir)
  with open(args.results, "w") as f:
    json.dump(results, f, indent=1)
  results_io.save_meta(os.path.join(HERE, "results"), {"arms": list(ARMS), "wall_s": times}, code_commit)
  command = (f"PYTHONPATH=. python experiments/distill/run.py --workdir {args.workdir} "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.1f} "
             f"on {os.cpu_count()} CPUs)")
  print(report(results, args.out, times, command), file=sys.stderr)


if __name__ == "__main__":
  main()
