"""Each experiment rebuilds its plots and tables from its stored data (``run.py --from-results``, no training)."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"


def _from_results(name: str, out: pathlib.Path) -> str:
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(EXPERIMENTS / name / "run.py"), "--from-results", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  return (out / "summary.md").read_text()


def test_moe_balance_reports_every_stored_run_with_its_seed(tmp_path):
  results = EXPERIMENTS / "moe_balance" / "results"
  meta = json.loads((results / "meta.json").read_text())
  assert meta["commit"] and meta["setup"]["seeds"]
  summary = _from_results("moe_balance", tmp_path)
  assert (tmp_path / "load.png").stat().st_size > 0
  for path in sorted(results.glob("*.jsonl.gz")):
    arm, seed = path.name[:-len(".jsonl.gz")].rsplit("_seed", 1)
    with gzip.open(path, "rt") as f:
      records = [json.loads(line) for line in f]
    last_eval = [r for r in records if "eval_loss" in r][-1]["eval_loss"]
    assert f"| {arm} (" in summary and f"| {seed} | {records[-1]['step']} |" in summary
    assert f"{last_eval:.3f}" in summary  # the table is the stored data, not retyped


def test_distill_report_matches_results_json(tmp_path):
  results = json.loads((EXPERIMENTS / "distill" / "results.json").read_text())
  summary = _from_results("distill", tmp_path)
  for arm in ("distilled", "labels", "generalist"):
    assert (tmp_path / f"experts_{arm}.png").stat().st_size > 0
    for domain, values in results[arm]["domains"].items():
      assert f"{values['student_ce']:.3f}" in summary, (arm, domain)
  committed = (EXPERIMENTS / "distill" / "summary.md").read_text().splitlines()
  table_rows = [line for line in summary.splitlines() if line.startswith("|")]
  assert table_rows and all(row in committed for row in table_rows)  # the committed tables are the stored data


@pytest.mark.parametrize("name", ["long_context"])
def test_long_context_report_matches_the_committed_summary(tmp_path, name):
  summary = _from_results(name, tmp_path)
  assert summary == (EXPERIMENTS / name / "summary.md").read_text()
  assert (tmp_path / "heatmaps.png").stat().st_size > 0


@pytest.mark.parametrize("experiment,sweep,best", [
    ("muon_adam_lr", "muon_adam_lr", "| muon | adam_lr_ratio=3 **best** | 1.9189 |"),
    ("optimizer_ablation", "optimizers", "| muon | learning_rate=0.01 **best** | 2.0080 |"),
])
def test_sweep_report_regenerates_from_the_stored_runs(tmp_path, experiment, sweep, best):
  """experiments/muon_adam_lr and optimizer_ablation: the sweep resumes every stored run (no training)
  and writes the same tables, from the stored per-step curves."""
  import tarfile

  from moejax.config import load_config
  from moejax.sweep import run_sweep

  here = EXPERIMENTS / experiment
  with tarfile.open(here / "runs.tar.gz") as tar:
    tar.extractall(tmp_path, filter="data")
  run_sweep(load_config(str(ROOT / "configs" / "tiny.py")), str(ROOT / "experiments" / "sweeps" / f"{sweep}.py"),
            str(tmp_path))
  tables = lambda text: text[text.index("## Summary"):text.index("## Plots")]
  stored = (here / "results.md").read_text()
  assert tables((tmp_path / "results.md").read_text()) == tables(stored)
  assert best in stored  # the write-up's numbers are these
  assert not list(tmp_path.glob("runs/*/*/checkpoints"))  # nothing was trained


@pytest.mark.parametrize("name, arms, last_step", [
    ("distill", ("distilled", "labels", "generalist"), 200),
    ("long_context", ("dense", "sliding", "dsa", "v4"), 500),
    ("moe_balance", None, 200),
])
def test_every_arm_stores_its_per_step_curve_with_provenance(name, arms, last_step):
  """results/<arm>.jsonl.gz: the logged metrics of every arm to its last step; meta.json names the commit."""
  results = EXPERIMENTS / name / "results"
  meta = json.loads((results / "meta.json").read_text())
  assert len(meta["commit"]) == 40 and meta["command"] and meta["date"]
  stored = {p.name[:-len(".jsonl.gz")]: p for p in results.glob("*.jsonl.gz")}
  assert arms is None or sorted(stored) == sorted(arms)
  for arm, path in stored.items():
    with gzip.open(path, "rt") as f:
      records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and steps[-1] == last_step and len(steps) >= 10, arm
    assert all(r["loss"] > 0 for r in records if "loss" in r), arm
