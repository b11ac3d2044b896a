"""Raw per-step metrics of experiment arms, stored next to their plots.

An experiment directory keeps ``results/<arm>.jsonl.gz`` (the arm's
``metrics.jsonl`` records, gzip-compressed, floats rounded to 5 significant
digits) and ``results/meta.json`` (commit, date, command, and a free-form
``setup``), so its report can be regenerated from the stored data without
retraining (``run.py --from-results``).
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import subprocess
import sys


def _round(value):
  if isinstance(value, float):
    return float(f"{value:.5g}")
  if isinstance(value, list):
    return [_round(v) for v in value]
  return value


def commit() -> str:
  """``git rev-parse HEAD`` of the working tree, ``+dirty`` when it has uncommitted changes."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def save_arm(results_dir: str, arm: str, records: list[dict]) -> str:
  """Writes ``records`` (one dict per logged step) to ``results_dir/<arm>.jsonl.gz``; returns the path."""
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f"{arm}.jsonl.gz")
  # mtime=0: the same records give the same bytes, so a rerun does not show up as a change.
  with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
    for record in records:
      f.write((json.dumps({k: _round(v) for k, v in record.items()}) + "\n").encode())
  return path


def load_arm(results_dir: str, arm: str) -> list[dict]:
  """The records :func:`save_arm` stored for ``arm``."""
  path = os.path.join(results_dir, f"{arm}.jsonl.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: run the experiment without --from-results first to "
                            "train this arm and store its metrics")
  with gzip.open(path, "rt") as f:
    return [json.loads(line) for line in f]


def save_meta(results_dir: str, setup: dict, code_commit: str | None = None) -> None:
  """Writes ``results_dir/meta.json``: commit, UTC date, the command line and ``setup``.

  ``code_commit``: the commit the runs started from (take :func:`commit` before training, since the
  tree may move on during a long run); the current one when None.
  """
  os.makedirs(results_dir, exist_ok=True)
  meta = {"commit": code_commit or commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "setup": setup}
  with open(os.path.join(results_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")


def load_meta(results_dir: str) -> dict:
  with open(os.path.join(results_dir, "meta.json")) as f:
    return json.load(f)
