"""Running a sweep: every run an ordinary ``train(cfg, WORKDIR/runs/<name>)``.

Resumable: a run that finished has ``result.json`` and is skipped; an
interrupted one resumes from its own checkpoints (``train`` does that). A
run that diverges (``NonFiniteError``) is recorded as diverged (final loss
inf) and the sweep goes on. Runs go sequentially in this process, or
``parallel`` at a time in fresh processes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import multiprocessing
import os
import statistics
from typing import Any

import ml_collections

from moejax import config as config_lib
from moejax.sweep.analysis import Comparison, Curve, RunResult, grid_edge_warnings, read_run, steps_to_reach, summarize
from moejax.sweep.report import write_csv, write_markdown, write_plots
from moejax.sweep.spec import (Run, Sweep, budget_runs, check_command_line, load_sweep, main_runs, quick,
                               run_config, tokens_per_step)

log = logging.getLogger(__name__)
RESULT = "result.json"


def _train_one(cfg_dict: dict, run_dir: str, overrides: dict, cache_dir: str | None = None) -> dict:
  """Trains one run (also in a worker process); returns what goes in result.json."""
  import jax

  from moejax.train import NonFiniteError, train

  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)

  cfg = ml_collections.ConfigDict(cfg_dict)
  outcome: dict[str, Any] = {"overrides": overrides, "config": json.loads(config_lib.to_json(cfg)),
                             "diverged": False}
  try:
    train(cfg, run_dir)
  except NonFiniteError as err:
    outcome.update(diverged=True, error=str(err))
  with open(os.path.join(run_dir, RESULT), "w") as f:
    json.dump(outcome, f, indent=2, default=str)
  return outcome


def _with_defaults(recorded: dict, defaults: dict) -> dict:
  """``recorded`` with every key it lacks taken from ``defaults``, at every depth."""
  out = dict(recorded)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _with_defaults(out[key], value)
  return out


def _execute(runs: list[Run], cfgs: dict[str, ml_collections.ConfigDict], overrides: dict[str, dict],
             workdir: str, parallel: int) -> None:
  todo = []
  defaults = json.loads(config_lib.to_json(config_lib.base_config()))  # what a field missing from a record ran with
  for run in runs:
    run_dir = os.path.join(workdir, "runs", run.name)
    done = os.path.join(run_dir, RESULT)
    if os.path.exists(done):
      with open(done) as f:
        # a field the run's record lacks was added to the schema since: it ran with that field's default
        recorded = _with_defaults(json.load(f)["config"], defaults)
      wanted = json.loads(config_lib.to_json(cfgs[run.name]))
      diffs = [f"{sec}.{k}: {recorded.get(sec, {}).get(k)!r} there, {v!r} now"
               for sec, fields in wanted.items() if isinstance(fields, dict)
               for k, v in fields.items() if recorded.get(sec, {}).get(k) != v]
      if diffs or recorded.get("seed") != wanted["seed"]:
        raise config_lib.ConfigError(
            f"{run_dir} finished with other settings than this sweep asks for ({'; '.join(diffs) or 'seed'}); "
            "use a new --workdir or delete that run directory.")
      log.info("sweep: %s finished earlier, skipped", run.name)
      continue
    os.makedirs(run_dir, exist_ok=True)
    todo.append((run, run_dir))
  if parallel <= 1:
    for i, (run, run_dir) in enumerate(todo):
      log.info("sweep: run %d/%d: %s", i + 1, len(todo), run.name)
      _train_one(cfgs[run.name].to_dict(), run_dir, overrides[run.name])
    return
  log.info("sweep: %d runs, %d at a time: %s", len(todo), parallel, ", ".join(r.name for r, _ in todo))
  with concurrent.futures.ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
    import jax

    cache_dir = jax.config.jax_compilation_cache_dir
    futures = [pool.submit(_train_one, cfgs[run.name].to_dict(), run_dir, overrides[run.name], cache_dir)
               for run, run_dir in todo]
    for future in concurrent.futures.as_completed(futures):
      future.result()


def _results(runs: list[Run], cfgs: dict[str, ml_collections.ConfigDict], workdir: str) -> list[RunResult]:
  out = []
  for run in runs:
    run_dir = os.path.join(workdir, "runs", run.name)
    result = read_run(run, run_dir, tokens_per_step(cfgs[run.name])) if _has_evals(run_dir) else _empty(run)
    with open(os.path.join(run_dir, RESULT)) as f:
      if json.load(f)["diverged"]:
        result.final_eval_loss = result.final_train_loss = math.inf
    out.append(result)
  return out


def _has_evals(run_dir: str) -> bool:
  path = os.path.join(run_dir, "metrics.jsonl")
  return os.path.exists(path) and any('"eval_loss"' in line for line in open(path))


def _empty(run: Run) -> RunResult:
  import numpy as np

  nothing = np.zeros(0)
  return RunResult(run, Curve(nothing, nothing, nothing, nothing), math.inf, math.inf, 0.0)


def _plan(runs: list[Run], sweep: Sweep, base_cfg, base_steps: int | None = None, command_line=None):
  overrides = {r.name: r.overrides(sweep, base_steps or 0, command_line) for r in runs}
  cfgs = {r.name: run_config(base_cfg, overrides[r.name], r.name) for r in runs}
  return cfgs, overrides


@contextlib.contextmanager
def _shared_compilations(workdir: str):
  """Runs differing only in their seed compile to the same programs: a persistent
  compilation cache in the workdir (unless one is configured) compiles them once.
  JAX reads the setting at its first compilation, so it helps a fresh process
  (the CLI, --parallel workers); the previous value is restored afterwards."""
  import jax

  before = jax.config.jax_compilation_cache_dir
  if not before:
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "jax_cache"))
  try:
    yield jax.config.jax_compilation_cache_dir
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def run_sweep(base_cfg: ml_collections.ConfigDict, sweep: Sweep | str, workdir: str, parallel: int = 1,
              command: str = "", overrides: dict | None = None, quick_run: bool = False) -> Comparison:
  """Runs (or resumes) the sweep in ``workdir`` and writes results.csv, results.md, plots.

  ``overrides`` ({"train.steps": 50}, the command line's --config.FIELD flags)
  apply to every run over the sweep file's settings; fields an arm fixes or
  tunes are refused. ``quick_run``: the sweep shrunk by :func:`quick`.
  Every run's config is built and validated before anything trains.
  """
  sweep = load_sweep(sweep) if isinstance(sweep, str) else sweep
  sweep = quick(sweep) if quick_run else sweep
  check_command_line(sweep, overrides or {})
  os.makedirs(workdir, exist_ok=True)
  with _shared_compilations(workdir):
    return _run(base_cfg, sweep, workdir, parallel, command, overrides or {})


def _run(base_cfg, sweep: Sweep, workdir: str, parallel: int, command: str, command_line: dict) -> Comparison:
  runs = main_runs(sweep)
  cfgs, overrides = _plan(runs, sweep, base_cfg, command_line=command_line)
  budgets = {(c.train.steps, tokens_per_step(c)) for c in cfgs.values()}
  if len(budgets) > 1:
    raise config_lib.ConfigError(f"the compared runs train for different (steps, tokens per step) {sorted(budgets)}; "
                                 "comparisons are at equal budget, so keep train.steps, batch_size and seq_len "
                                 "out of the arms' fixed settings and grids.")
  _execute(runs, cfgs, overrides, workdir, parallel)
  results = _results(runs, cfgs, workdir)

  if sweep.budgets:
    base = [r for r in results if r.run.arm == sweep.baseline]
    trials = sweep.arms[sweep.baseline].trials()
    best = min(trials, key=lambda t: statistics.median(r.final_eval_loss for r in base if r.run.trial == t))
    extra = budget_runs(sweep, best)
    base_steps = cfgs[next(r for r in runs if r.arm == sweep.baseline and r.trial == best).name].train.steps
    extra_cfgs, extra_overrides = _plan(extra, sweep, base_cfg, base_steps, command_line)
    _execute(extra, extra_cfgs, extra_overrides, workdir, parallel)
    results += _results(extra, extra_cfgs, workdir)
    cfgs.update(extra_cfgs)

  for name, arm in sweep.arms.items():
    if all(r.final_eval_loss == math.inf for r in results if r.run.arm == name):
      raise config_lib.ConfigError(f"every run of arm {name!r} diverged; lower its learning rates.")
  first = cfgs[runs[0].name]
  comparison = summarize(sweep, results, float(first.train.steps * tokens_per_step(first)))
  for warning in grid_edge_warnings(comparison):
    log.warning("sweep: %s", warning)
  steps_to_target = {r.run.name: steps_to_reach(r.curve, comparison.target)
                     for r in results if r.run.budget == 1.0 and len(r.curve.loss)}
  write_csv(os.path.join(workdir, "results.csv"), results, steps_to_target)
  plots = write_plots(workdir, comparison)
  header = ("# Sweep results\n\n"
            + (f"`{command}`\n\n" if command else "")
            + (f"Applied to every run from the command line: {command_line}.\n\n" if command_line else "")
            + f"{len(sweep.arms)} arms x {len(sweep.arms[sweep.baseline].trials())} trials x {len(sweep.seeds)} "
            f"seeds ({len(runs)} runs) + {len(results) - len(runs)} baseline budget runs; "
            f"{first.train.steps} steps of {tokens_per_step(first):,} tokens, validation every "
            f"{first.train.eval_every} steps on {first.train.eval_batches} batches.")
  write_markdown(os.path.join(workdir, "results.md"), comparison, header, plots)
  return comparison
