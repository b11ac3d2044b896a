"""Compare router variants: a base config + named variants x seeds, through the sweep runner.

::

    from moejax import lab
    result = lab.compare(cfg, {"v3": "v3", "mixtral": "mixtral", "mine": MyRouter}, seeds=(0, 1),
                         workdir="workdirs/lab")
    result.table          # one row per variant (list of dicts; result.dataframe() with pandas)
    print(result.markdown())

A variant is a recipe name of ``ROUTER_RECIPES`` (its fields replace the
routing fields of the base, every other recipe field back at its default), a
dict of dotted config overrides (``{"model.moe.top_k": 2}``, may hold
``"recipe": name`` too), or a router class (registered in ``ROUTERS`` under
the variant's name unless it already is). Runs go through
:func:`moejax.sweep.run_sweep` (``WORKDIR/runs/<variant>/default_s<seed>``,
resumable, in this process so notebook routers are seen).

Table values are computed from each run's own ``metrics.jsonl`` over the
last ``tail`` logged records (MoE metrics averaged over those records and
over MoE layers): see :func:`run_row` for every column.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

import ml_collections
import numpy as np

from moejax.layers.routers import ROUTER_RECIPES, ROUTERS
from moejax.sweep import Arm, Sweep, run_sweep

DEAD_LOAD = 0.01  # an expert below 1% of the mean load (the trainer's collapse threshold) counts as dead
MOE_METRICS = ("load_max_over_mean", "load_min_over_mean", "router_entropy", "dropped_fraction")


def variant_overrides(name: str, spec) -> dict:
  """Dotted config overrides for one variant (see the module docstring)."""
  if isinstance(spec, type):
    registered = [n for n in ROUTERS.names() if ROUTERS.get(n) is spec]
    if not registered:
      ROUTERS.register(name)(spec)
    return {"model.moe.router": registered[0] if registered else name}
  spec = {"recipe": spec} if isinstance(spec, str) else dict(spec)
  if isinstance(spec.get("model.moe.router"), type):  # {"recipe": ..., "model.moe.router": MyRouter}
    spec.update(variant_overrides(name, spec["model.moe.router"]))
  recipe = spec.pop("recipe", None)
  out = {}
  if recipe is not None:
    if recipe not in ROUTER_RECIPES:
      raise ValueError(f"variant {name!r}: unknown recipe {recipe!r}; known: {', '.join(ROUTER_RECIPES)}")
    from moejax.config import base_config

    defaults = base_config().model.moe
    fields = sorted({k for r in ROUTER_RECIPES.values() for k in r})
    out = {f"model.moe.{k}": ROUTER_RECIPES[recipe].get(k, defaults[k]) for k in fields}
  return {**out, **spec}


def read_metrics(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def moe_layers(records: list[dict]) -> list[str]:
  """MoE layer paths (``layer_1/mlp``) that logged an expert load, in layer order."""
  names = {k.rsplit("/", 1)[0] for k in records[-1] if k.endswith("/expert_load")}
  return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in n.replace("_", "/").split("/")])


def run_row(run_dir: str, tail: int = 5) -> dict:
  """One run's numbers from its metrics.jsonl.

  ``train_loss``: mean ``loss`` over the last ``tail`` records; ``eval_loss``:
  the last ``eval_loss``; ``load_max_over_mean`` etc.: mean over those records
  and the MoE layers; ``dead_experts``: (layer, expert) pairs whose mean
  ``expert_load`` over those records is below ``DEAD_LOAD``; ``tokens_per_s``:
  median over records after the first (which includes compilation).
  """
  records = read_metrics(run_dir)
  last = records[-tail:]
  layers = moe_layers(records)
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  row = {"train_loss": float(np.mean([r["loss"] for r in last])), "eval_loss": evals[-1] if evals else float("nan"),
         "steps": records[-1]["step"]}
  for metric in MOE_METRICS:
    row[metric] = float(np.mean([r[f"{layer}/{metric}"] for r in last for layer in layers])) if layers else 0.0
  row["dead_experts"] = int(sum(np.sum(np.mean([r[f"{layer}/expert_load"] for r in last], 0) < DEAD_LOAD)
                                for layer in layers))
  speeds = [r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r]
  row["tokens_per_s"] = float(statistics.median(speeds)) if speeds else float("nan")
  return row


def load_run(run_dir: str, devices=None):
  """(config, Experiment, state) of a finished run directory (its config.json and newest checkpoint)."""
  from moejax.interop.hf import workdir_config
  from moejax.train import load_checkpoint

  cfg = workdir_config(run_dir)
  exp, _, state = load_checkpoint(cfg, run_dir, devices)
  return cfg, exp, state


SUMMARY = ("eval_loss", "train_loss", "dead_experts", *MOE_METRICS, "tokens_per_s")


@dataclasses.dataclass
class LabResult:
  """What :func:`compare` ran and measured."""

  workdir: str
  variants: dict[str, dict]          # name -> config overrides
  seeds: tuple[int, ...]
  run_dirs: dict[str, list[str]]     # name -> one run directory per seed
  runs: list[dict]                   # one row per run (variant, seed, run_row(...))
  table: list[dict]                  # one row per variant: mean and std over seeds of SUMMARY

  def dataframe(self):
    """``self.table`` as a pandas DataFrame (pandas must be installed)."""
    import pandas as pd

    return pd.DataFrame(self.table).set_index("variant")

  def markdown(self, digits: int = 4) -> str:
    cols = ["variant", "seeds", "eval_loss", "±", "train_loss", "dead_experts", "max/mean", "min/mean",
            "entropy", "dropped", "tokens/s"]
    keys = ["variant", "seeds", "eval_loss", "eval_loss_std", "train_loss", "dead_experts", "load_max_over_mean",
            "load_min_over_mean", "router_entropy", "dropped_fraction", "tokens_per_s"]
    fmt = lambda v: f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in self.table]
    return "\n".join(lines)

  def _repr_markdown_(self) -> str:
    return self.markdown()


def summarize(runs: list[dict], names: list[str]) -> list[dict]:
  """Mean (and population std of the losses) over seeds, per variant."""
  table = []
  for name in names:
    mine = [r for r in runs if r["variant"] == name]
    row = {"variant": name, "seeds": len(mine)}
    for key in SUMMARY:
      row[key] = float(np.mean([r[key] for r in mine]))
    for key in ("eval_loss", "train_loss"):
      row[f"{key}_std"] = float(np.std([r[key] for r in mine]))
    table.append(row)
  return table


def compare(base_cfg: ml_collections.ConfigDict, variants: dict, seeds=(0, 1), workdir: str = "workdirs/lab",
            steps: int | None = None, tail: int = 5) -> LabResult:
  """Trains (or resumes) every variant x seed and returns their table (also written to WORKDIR/table.md)."""
  overrides = {name: variant_overrides(name, spec) for name, spec in variants.items()}
  common = {"train.steps": steps} if steps else {}
  names = list(variants)
  sweep = Sweep(arms={name: Arm(o) for name, o in overrides.items()}, common=common, seeds=tuple(seeds),
                baseline=names[0])
  run_sweep(base_cfg, sweep, workdir)
  run_dirs = {name: [os.path.join(workdir, "runs", name, f"default_s{seed}") for seed in seeds] for name in names}
  runs = [{"variant": name, "seed": seed, "run_dir": d, **run_row(d, tail)}
          for name in names for seed, d in zip(seeds, run_dirs[name])]
  result = LabResult(workdir, overrides, tuple(seeds), run_dirs, runs, summarize(runs, names))
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(result.markdown() + "\n")
  return result
