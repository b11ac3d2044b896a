"""Sweep outputs: ``results.csv`` (one row per run), ``results.md`` and PNG plots."""

from __future__ import annotations

import csv
import math
import os
import statistics

import numpy as np

from moejax.sweep.analysis import Comparison, RunResult, grid_edge_warnings

PLOTS = {
    "loss_vs_steps.png": ("steps", "step"),
    "loss_vs_tokens.png": ("tokens", "training tokens"),
    "loss_vs_wall_time.png": ("wall_s", "wall time (s, compilation excluded)"),
}


def _fmt(x, digits=4) -> str:
  if x is None:
    return "—"
  if isinstance(x, float) and math.isinf(x):
    return "∞"
  return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _trial_text(trial: dict) -> str:
  return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in trial.items()) or "default"


def write_csv(path: str, results: list[RunResult], steps_to_target: dict[str, float | None]) -> None:
  fields = sorted({k for r in results for k in r.run.trial})
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "arm", *fields, "seed", "budget", "steps", "tokens", "final_eval_loss",
                "final_train_loss", "wall_s", "steps_to_baseline_final_loss"])
    for r in results:
      w.writerow([r.run.name, r.run.arm, *(r.run.trial.get(k, "") for k in fields), r.run.seed, r.run.budget,
                  int(r.curve.steps[-1]), int(r.curve.tokens[-1]), f"{r.final_eval_loss:.6f}",
                  f"{r.final_train_loss:.6f}", f"{r.wall_s:.2f}", _fmt(steps_to_target.get(r.run.name))])


def write_markdown(path: str, cmp: Comparison, header: str, plots: list[str]) -> None:
  base = cmp.arms[cmp.baseline]
  lines = [header, "", f"Baseline: **{cmp.baseline}**, final validation loss {cmp.target:.4f} (median over seeds at "
           "its best trial). Every arm at its own best trial (median final validation loss).", "",
           "## Summary (end of training)", "",
           "| arm | best trial | final val loss (median) | Δ vs baseline | steps to baseline's final loss "
           "| speedup (steps) | D_eff / D | wall s (median) |",
           "|---|---|---|---|---|---|---|---|"]
  for s in sorted(cmp.arms.values(), key=lambda s: s.final_loss):
    lines.append(f"| {s.arm} | {_trial_text(s.best_trial)} | {s.final_loss:.4f} | {s.final_loss - base.final_loss:+.4f} "
                 f"| {_fmt(s.steps_to_target, 4)} | {_fmt(s.steps_speedup, 3)} | {_fmt(s.d_eff_ratio, 3)} "
                 f"| {s.wall_s:.1f} |")
  edges = grid_edge_warnings(cmp)
  if edges:
    lines += ["", "**Warning: best trial on the edge of its grid.**", ""] + [f"- {w}" for w in edges]
  lines += ["", "## Tuning (final validation loss per trial: median [min, max] over seeds)", "",
            "| arm | trial | median | min | max |", "|---|---|---|---|---|"]
  for s in cmp.arms.values():
    for trial, losses in s.trial_losses:
      mark = " **best**" if trial == s.best_trial else ""
      lines.append(f"| {s.arm} | {_trial_text(trial)}{mark} | {statistics.median(losses):.4f} | {min(losses):.4f} "
                   f"| {max(losses):.4f} |")
  lines += ["", "## Baseline loss vs tokens (D_eff fit)", ""]
  lines.append("| tokens | final val loss (median) |")
  lines.append("|---|---|")
  lines += [f"| {int(d):,} | {loss:.4f} |" for d, loss in cmp.fit_points]
  if cmp.fit:
    f = cmp.fit
    lines += ["", f"Fit: L(D) = {f.E:.4f} + {f.A:.4f} · (D / {int(f.d_ref):,})^-{f.alpha:.3f}; "
              "D_eff / D = the tokens the baseline would need to reach an arm's final loss, over the tokens used "
              "(∞: below the fit's asymptote E; values past the largest budget are extrapolated)."]
  else:
    lines += ["", f"No fit: {cmp.fit_error}"]
  lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + "\n")


def write_plots(workdir: str, cmp: Comparison) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(cmp.arms)}
  written = []
  for filename, (attr, label) in PLOTS.items():
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in cmp.arms.values():
      for r in s.best_results:
        ax.plot(getattr(r.curve, attr), r.curve.loss, color=colors[s.arm], alpha=0.25, lw=0.8)
      ax.plot(getattr(s.curve, attr), s.curve.loss, color=colors[s.arm], lw=2,
              label=f"{s.arm} ({_trial_text(s.best_trial)})")
    ax.axhline(cmp.target, color="gray", ls=":", lw=1)
    ax.set(xlabel=label, ylabel="validation loss", title="best trial per arm (median over seeds)")
    ax.legend(fontsize=8)
    _tight_ylim(ax, cmp)
    written.append(_save(fig, workdir, filename))

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for s in cmp.arms.values():
    keys = list(s.trial_losses[0][0])
    numeric = len(keys) == 1 and all(isinstance(t[keys[0]], (int, float)) for t, _ in s.trial_losses)
    xs = [t[keys[0]] for t, _ in s.trial_losses] if numeric else list(range(len(s.trial_losses)))
    med = [statistics.median(losses) for _, losses in s.trial_losses]
    err = [[m - min(l) for m, (_, l) in zip(med, s.trial_losses)], [max(l) - m for m, (_, l) in zip(med, s.trial_losses)]]
    ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, color=colors[s.arm], label=s.arm)
    if numeric:
      ax.set_xscale("log")
      ax.set_xlabel(keys[0])
  ax.set(ylabel="final validation loss", title="tuning: median [min, max] over seeds")
  ax.legend(fontsize=8)
  written.append(_save(fig, workdir, "final_loss_vs_trial.png"))

  if cmp.fit:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    d = np.array([p[0] for p in cmp.fit_points])
    grid = np.geomspace(d.min() / 2, d.max() * 4, 200)
    ax.plot(grid, cmp.fit(grid), color=colors[cmp.baseline], label=f"{cmp.baseline} fit")
    ax.scatter(d, [p[1] for p in cmp.fit_points], color=colors[cmp.baseline], zorder=3)
    for s in cmp.arms.values():
      if s.arm != cmp.baseline and s.d_eff_ratio and math.isfinite(s.d_eff_ratio):
        ax.scatter([cmp.fit.d_ref * s.d_eff_ratio], [s.final_loss], marker="*", s=120, color=colors[s.arm],
                   label=f"{s.arm}: D_eff/D={s.d_eff_ratio:.2f}", zorder=4)
    ax.set(xscale="log", xlabel="training tokens D", ylabel="final validation loss",
           title=f"{cmp.baseline} loss vs tokens; D_eff of each arm")
    ax.legend(fontsize=8)
    written.append(_save(fig, workdir, "baseline_fit.png"))
  return written


def _tight_ylim(ax, cmp: Comparison) -> None:
  finals = [s.final_loss for s in cmp.arms.values()]
  starts = [s.curve.loss[min(1, len(s.curve.loss) - 1)] for s in cmp.arms.values()]
  ax.set_ylim(min(finals) - 0.05 * abs(min(finals)), max(starts) + 0.05 * abs(max(starts)))


def _save(fig, workdir: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, name), dpi=110)
  import matplotlib.pyplot as plt

  plt.close(fig)
  return name
