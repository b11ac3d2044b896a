"""The style gate: ``ruff check`` (configured in pyproject.toml for the 2-space style) finds nothing."""

import os
import subprocess
import sys

from tests.oracle import require

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  require("ruff")
  out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
