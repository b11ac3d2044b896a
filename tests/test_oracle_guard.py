"""The optional-dependency guard (tests/oracle.py): a missing oracle fails CI instead of skipping."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MISSING = "moejax_test_no_such_module"


def test_no_test_uses_importorskip():
  """pytest.importorskip skips silently under CI too; tests use tests.oracle.require instead."""
  offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")
               if p.name not in ("oracle.py", "test_oracle_guard.py") and "importorskip" in p.read_text()]
  assert not offenders, f"use tests.oracle.require instead of pytest.importorskip in {offenders}"


def _pytest(tmp_path, body: str, ci: bool) -> subprocess.CompletedProcess:
  (tmp_path / "test_guarded.py").write_text(f"from tests.oracle import require\n\n{body}")
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  if ci:
    env["CI"] = "true"
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                         "--rootdir", str(tmp_path), "test_guarded.py"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("body", [
  f'def test_needs_it():\n  require("{MISSING}")\n',                                      # inside a test
  f'mod = require("{MISSING}")\n\n\ndef test_needs_it():\n  assert mod\n',                 # at module level
], ids=["in_test", "module_level"])
def test_missing_oracle_skips_locally_and_fails_under_ci(tmp_path, body):
  local = _pytest(tmp_path, body, ci=False)
  assert local.returncode in (0, 5) and "1 skipped" in local.stdout, local.stdout + local.stderr  # 5: all skipped
  ci = _pytest(tmp_path, body, ci=True)
  assert ci.returncode != 0, ci.stdout + ci.stderr
  assert "CI=true: an oracle test cannot be skipped" in ci.stdout and MISSING in ci.stdout, ci.stdout


def test_present_module_is_returned(tmp_path):
  result = _pytest(tmp_path, 'def test_it():\n  assert require("json").dumps(1) == "1"\n', ci=True)
  assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
