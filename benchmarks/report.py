"""Regenerates the tables of docs/benchmarks.md from the raw results in benchmarks/results/.

  python benchmarks/report.py            # rewrite every generated block in place
  python benchmarks/report.py --check    # exit 1 if a block differs from what the results give

A generated block in the Markdown looks like::

    <!-- table: optimizer_step preset=tiny -->
    ...replaced...
    <!-- /table -->

``optimizer_step`` names the benchmark (``benchmarks/optimizer_step.py``, whose ``table(record)``
renders one result as Markdown); ``key=value`` pairs select the newest result whose ``params`` match
(values parsed as JSON where they parse). Under each table a line gives the result's provenance: the
commit, the date, the machine, the load average before and after, and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from moejax.benchmarking import latest  # noqa: E402

DOC = os.path.join(ROOT, "docs", "benchmarks.md")
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
BLOCK = re.compile(r"(<!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def provenance(record: dict) -> str:
  """One Markdown line: where, when and how a result was measured."""
  m = record.get("machine", {})
  commit = (record.get("commit") or "no git")[:8] + (" (uncommitted changes)" if record.get("dirty") else "")
  device = m.get("backend", "cpu")
  if device != "cpu":
    device = f"{m.get('device_count')} x {', '.join(m.get('devices', []))}"
  else:
    device = f"CPU: {m.get('cpu', '?')}, {m.get('cores_usable', m.get('cores'))} cores"
  load = lambda k: "/".join(f"{x:g}" for x in record[k]) if record.get(k) else "?"
  return (f"<sub>Measured {record['date'][:10]} at commit `{commit}` on {device}, jax {m.get('jax', '?')}; "
          f"load average (1/5/15 min) {load('load_average_before')} before, {load('load_average_after')} after; "
          f"`python {record['command']}`; raw: `{record['_path']}`.</sub>\n")


def render(spec: str, results_dir: str = RESULTS_DIR) -> str:
  """The Markdown (table + provenance line) for one ``<!-- table: SPEC -->`` block."""
  name, *pairs = spec.split()
  params = {k: _value(v) for k, v in (p.split("=", 1) for p in pairs)}
  record = latest(name, results_dir, **params)
  if record is None:
    raise SystemExit(f"docs/benchmarks.md asks for a {name} result with {params or 'any params'}, but "
                     f"{os.path.relpath(os.path.join(results_dir, name))} has none; run benchmarks/{name}.py.")
  record["_path"] = os.path.relpath(record.pop("_file"), ROOT)
  module = importlib.import_module(f"benchmarks.{name}")
  return module.table(record).rstrip("\n") + "\n\n" + provenance(record)


def regenerate(text: str, results_dir: str = RESULTS_DIR) -> str:
  return BLOCK.sub(lambda m: m.group(1) + render(m.group("spec"), results_dir) + m.group(4), text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="fail if docs/benchmarks.md is not up to date")
  parser.add_argument("--doc", default=DOC)
  args = parser.parse_args()
  with open(args.doc) as f:
    old = f.read()
  new = regenerate(old)
  if args.check:
    if new != old:
      sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), args.doc, "regenerated"))
      raise SystemExit(f"{args.doc} is out of date with benchmarks/results/; run python benchmarks/report.py")
    print(f"{args.doc}: every generated table matches its results")
    return
  with open(args.doc, "w") as f:
    f.write(new)
  print(f"rewrote {len(BLOCK.findall(new))} tables in {args.doc}")


if __name__ == "__main__":
  main()
