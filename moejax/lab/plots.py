"""Lab plots (matplotlib): each function saves a PNG under ``out_dir`` and returns the Figure
(shown inline when it is a notebook cell's last expression)."""

from __future__ import annotations

import os

import numpy as np

from moejax.lab.compare import LabResult, moe_layers, read_metrics


def _plt():
  import matplotlib.pyplot as plt

  return plt


def _save(fig, out_dir: str, name: str):
  os.makedirs(out_dir, exist_ok=True)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, name), dpi=110)
  return fig


def loss_curves(result: LabResult, key: str = "loss", out_dir: str | None = None):
  """``key`` (``loss`` or ``eval_loss``) over steps per variant: mean over seeds, band = [min, max]."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for i, (name, dirs) in enumerate(result.run_dirs.items()):
    curves = [[(r["step"], r[key]) for r in read_metrics(d) if key in r] for d in dirs]
    steps = np.array([s for s, _ in curves[0]])
    n = min(len(c) for c in curves)
    values = np.array([[v for _, v in c[:n]] for c in curves])
    color = plt.cm.tab10(i % 10)
    ax.plot(steps[:n], values.mean(0), color=color, lw=1.8, label=f"{name} ({len(dirs)} seeds)")
    ax.fill_between(steps[:n], values.min(0), values.max(0), color=color, alpha=0.2)
  ax.set(xlabel="step", ylabel=key, title=f"{key}: mean over seeds, band = min..max")
  ax.legend(fontsize=8)
  return _save(fig, out_dir or result.workdir, f"lab_{key}_curves.png")


def load_heatmap(run_dir: str, out_dir: str | None = None, name: str = "lab_expert_load.png"):
  """Per MoE layer: ``expert_load`` (assignments / mean; 1 = balanced) of each expert over logged steps."""
  plt = _plt()
  records = read_metrics(run_dir)
  layers = moe_layers(records)
  fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.4), squeeze=False)
  steps = [r["step"] for r in records if f"{layers[0]}/expert_load" in r]
  for ax, layer in zip(axes[0], layers):
    load_ExS = np.array([r[f"{layer}/expert_load"] for r in records if f"{layer}/expert_load" in r]).T
    im = ax.imshow(load_ExS, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, load_ExS.shape[0] - 0.5, -0.5))
    ax.set(xlabel="step", ylabel="expert", title=layer)
    fig.colorbar(im, ax=ax, label="load / mean")
  return _save(fig, out_dir or run_dir, name)


def balance_summary(result: LabResult, out_dir: str | None = None):
  """Per MoE layer and variant: max/mean and min/mean load over the table's tail records, mean over seeds."""
  plt = _plt()
  names = list(result.run_dirs)
  layers = moe_layers(read_metrics(result.run_dirs[names[0]][0]))
  fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
  width = 0.8 / len(names)
  for a, metric in enumerate(("load_max_over_mean", "load_min_over_mean")):
    for i, name in enumerate(names):
      per_layer = [np.mean([np.mean([r[f"{layer}/{metric}"] for r in read_metrics(d)[-5:]])
                            for d in result.run_dirs[name]]) for layer in layers]
      axes[a].bar(np.arange(len(layers)) + i * width, per_layer, width, label=name, color=plt.cm.tab10(i % 10))
    axes[a].axhline(1.0, color="gray", lw=0.8, ls=":")
    axes[a].set_xticks(np.arange(len(layers)) + width * (len(names) - 1) / 2, layers, fontsize=8)
    axes[a].set(title=metric.replace("_over_", " / "), ylabel="load / mean")
  axes[0].legend(fontsize=8)
  return _save(fig, out_dir or result.workdir, "lab_balance.png")


def specialisation(shares: dict[str, np.ndarray], labels, out_dir: str, name: str = "lab_specialisation.png",
                   title: str = "share of assignments"):
  """Heatmaps (rows: domains or token classes, columns: experts) per MoE layer, rows summing to 1."""
  plt = _plt()
  layers = list(shares)
  fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 0.5 * len(labels) + 1.8), squeeze=False)
  for ax, layer in zip(axes[0], layers):
    im = ax.imshow(shares[layer], aspect="auto", cmap="magma", vmin=0)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=8)
    ax.set(xlabel="expert", title=layer)
    fig.colorbar(im, ax=ax, label=title)
  return _save(fig, out_dir, name)


def stability(rows: list[dict], out_dir: str, name: str = "lab_routing_stability.png"):
  """Share of tokens whose top-k set changed between consecutive checkpoints, per MoE layer."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.0, 3.6))
  layers = [k for k in rows[0] if k not in ("from", "to")]
  for layer in layers:
    ax.plot([r["to"] for r in rows], [r[layer] for r in rows], marker="o", label=layer)
  ax.set(xlabel="checkpoint step (vs the previous one)", ylabel="tokens whose top-k changed", ylim=(0, 1.02),
         title="routing stability")
  ax.legend(fontsize=8)
  return _save(fig, out_dir, name)
