"""Benchmark provenance: interleaved timing, summaries, raw results, and docs tables generated from them."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from moejax import benchmarking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_YET_RUN: set[str] = set()  # benchmarks with a table() whose docs table is still to come


def test_interleaved_rotates_the_order_every_round():
  calls = []
  fns = {name: (lambda name=name: calls.append(name) or 1.0) for name in "abc"}
  samples = benchmarking.interleaved(fns, rounds=4)
  assert calls == list("abc" "bca" "cab" "abc")
  assert samples == {name: [1.0] * 4 for name in "abc"}


def test_summary_ratios_pair_each_round_with_the_baseline_of_that_round():
  base, other = [1.0, 2.0, 4.0, 3.0], [2.0, 3.0, 8.0, 3.0]
  s = benchmarking.summary(other, base)
  assert s["median_s"] == statistics.median(other) == 3.0
  assert (s["q1_s"], s["q3_s"]) == (2.75, 4.25)  # inclusive quartiles of 2, 3, 3, 8
  assert s["ratio"] == 3.0 / 2.5
  assert (s["ratio_min"], s["ratio_median"], s["ratio_max"]) == (1.0, 1.75, 2.0)  # 2, 1.5, 2, 1
  assert s["samples_s"] == other and s["n"] == 4


def test_results_record_provenance(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  results = benchmarking.Results("unit", params={"rounds": 3}, directory=str(tmp_path))
  results.add_rows([{"variant": "x", **benchmarking.summary([0.1, 0.2])}], tokens=7)
  with open(results.write()) as f:
    record = json.load(f)
  head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
  assert record["commit"] == (head or None) and isinstance(record["dirty"], (bool, type(None)))
  assert record["benchmark"] == "unit" and record["params"] == {"rounds": 3} and record["tokens"] == 7
  assert record["command"] and record["date"].startswith("20")
  assert record["machine"]["cores"] == os.cpu_count() and record["machine"]["cpu"]
  assert len(record["load_average_before"]) == 3 and len(record["load_average_after"]) == 3
  assert record["rows"][0]["samples_s"] == [0.1, 0.2]
  assert benchmarking.latest("unit", str(tmp_path), rounds=3)["rows"] == record["rows"]
  assert benchmarking.latest("unit", str(tmp_path), rounds=4) is None


def test_docs_benchmark_tables_are_generated_from_the_stored_results():
  """Every table in docs/benchmarks.md is what benchmarks/report.py renders from benchmarks/results/."""
  out = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
    doc = f.read()
  bench_dir = os.path.join(ROOT, "benchmarks")
  with_tables = {n[:-3] for n in os.listdir(bench_dir) if n.endswith(".py")
                 and "\ndef table(" in open(os.path.join(bench_dir, n)).read()}
  missing = sorted(n for n in with_tables - NOT_YET_RUN if f"<!-- table: {n}" not in doc)
  assert not missing, f"docs/benchmarks.md has no generated table for {missing}"


@pytest.mark.parametrize("doc", ["docs/benchmarks.md"])
def test_generated_blocks_name_their_raw_results(doc):
  with open(os.path.join(ROOT, doc)) as f:
    text = f.read()
  for block in text.split("<!-- table: ")[1:]:
    body = block.split("<!-- /table -->")[0]
    assert "raw: `benchmarks/results/" in body and "load average" in body


def test_top_ops_names_the_costly_op_and_its_source():
  import jax
  import jax.numpy as jnp

  @jax.jit
  def f(a, b):
    return jnp.tanh(jnp.einsum("ij,jk->ik", a, b)).sum()

  a = jnp.ones((256, 256), jnp.float32)
  rows = benchmarking.top_ops(f, a, a, repeats=2, count=5)
  assert rows and all(r["ms_per_call"] > 0 and r["calls"] >= 1 for r in rows)
  assert rows == sorted(rows, key=lambda r: -r["ms_per_call"])
  assert all(r["source"].startswith("jit(f)/") for r in rows)  # the JAX operation each op came from
