"""``WORKDIR/distill_report.md``: per-domain table and domain -> expert heatmaps.

On ``train.eval_batches`` validation batches of every domain: the student's
CE, its KL to the domain's teacher, the teacher's CE on the same tokens; and
for each MoE layer of the student, the share of each domain's routed
assignments received by each expert (rows sum to 1; uniform = 1 / E), as
``distill_experts_<layer>.png``. The numbers also go to ``distill_report.json``.
"""

from __future__ import annotations

import json
import os

import numpy as np


def domain_expert_shares(sums: dict) -> dict[str, np.ndarray]:
  """{"layer_1/mlp": [K, E] share of domain k's assignments per expert} from evaluation sums."""
  shares = {}
  for key, counts_KxE in sums.items():
    if key.startswith("routing/"):
      counts_KxE = np.asarray(counts_KxE, np.float64)
      shares[key[len("routing/"):]] = counts_KxE / np.maximum(counts_KxE.sum(-1, keepdims=True), 1.0)
  return shares


def plot_heatmap(share_KxE: np.ndarray, domains: list[str], title: str, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k, e = share_KxE.shape
  fig, ax = plt.subplots(figsize=(1.2 + 0.45 * e, 1.0 + 0.45 * k))
  im = ax.imshow(share_KxE, cmap="viridis", vmin=0.0, aspect="auto")
  ax.set_xticks(range(e))
  ax.set_yticks(range(k), domains)
  ax.set_xlabel("expert")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="share of the domain's assignments")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(exp, state, workdir: str) -> dict:
  """Evaluates the student (a ``DistillExperiment``), writes the report, returns its table."""
  cfg = exp.cfg
  sums = exp.evaluation_sums(state, cfg.train.eval_batches)
  weight_K = np.maximum(np.asarray(sums["weight_K"], np.float64), 1.0)
  names = [s.name for s in exp.slices]
  table = {name: {"student_ce": float(sums["ce_sum_K"][k] / weight_K[k]),
                  "kl_to_teacher": float(sums["kl_sum_K"][k] / weight_K[k]),
                  "teacher_ce": float(sums["teacher_ce_sum_K"][k] / weight_K[k]),
                  "tokens": float(weight_K[k])}
           for k, name in enumerate(names)}
  dc = cfg.distill
  lines = [f"# Distillation report: {os.path.abspath(workdir)}", "",
           f"Student: {cfg.model.num_layers} layers, d_model {cfg.model.d_model}, mlp_types "
           f"{tuple(cfg.model.mlp_types)}, {int(state.step)} steps. Objective: {dc.alpha} * CE + "
           f"{1 - dc.alpha:g} * T^2 * KL ({dc.kl}, T={dc.temperature}, {dc.mode}, teachers {dc.teacher_source}).",
           f"Validation: {cfg.train.eval_batches} batches of every domain (nats per token).", "",
           "| domain | student CE | KL(student, teacher) | teacher CE | tokens |", "|---|---|---|---|---|"]
  lines += [f"| {n} | {r['student_ce']:.4f} | {r['kl_to_teacher']:.4f} | {r['teacher_ce']:.4f} | {r['tokens']:.0f} |"
            for n, r in table.items()]
  shares = domain_expert_shares(sums)
  if shares:
    lines += ["", "## Domain -> expert assignment", "",
              "Share of each domain's routed assignments per expert (rows sum to 1; uniform = 1/E)."]
  for layer, share_KxE in shares.items():
    png = f"distill_experts_{layer.replace('/', '_')}.png"
    plot_heatmap(share_KxE, names, f"{layer}: domain -> expert share", os.path.join(workdir, png))
    lines += ["", f"### {layer}", "", f"![{layer}]({png})", "",
              "| domain | " + " | ".join(str(i) for i in range(share_KxE.shape[1])) + " |",
              "|---|" + "---|" * share_KxE.shape[1]]
    lines += [f"| {n} | " + " | ".join(f"{x:.2f}" for x in row) + " |" for n, row in zip(names, share_KxE)]
  with open(os.path.join(workdir, "distill_report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(workdir, "distill_report.json"), "w") as f:
    json.dump({"domains": table, "experts": {k: v.tolist() for k, v in shares.items()}}, f, indent=1)
  return {"domains": table, "experts": shares}
