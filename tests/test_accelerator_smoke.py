"""benchmarks/accelerator.py --smoke: the prepared accelerator suite runs end to end at tiny sizes (CPU)."""

import json
import os
import subprocess
import sys

import pytest

from tests.reliability import harness

pytestmark = pytest.mark.slow(minutes=4)  # on 2 cores; the longest modules start first (tests/conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def record(tmp_path_factory):
  out = tmp_path_factory.mktemp("accelerator")
  result = subprocess.run([sys.executable, "benchmarks/accelerator.py", "--smoke", "--steps", "1",
                           "--results-dir", str(out)], cwd=ROOT, env=harness.env(), capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  (path,) = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.endswith(".json")]
  with open(path) as f:
    return json.load(f) | {"stdout": result.stdout}


def test_every_case_and_backend_reports(record):
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import accelerator

  from moejax.layers.moe_dispatch import BACKENDS, available

  cases = {r["case"]: r for r in record["rows"] if "case" in r}
  assert list(cases) == list(accelerator.CASES)
  for name, r in cases.items():
    cfg = accelerator.case_config(name, smoke=True)
    assert r["tokens_per_step"] == cfg.train.batch_size * cfg.data.seq_len
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["median_s"])
    assert r["mfu"] is None  # CPU: no peak, so no invented MFU
    assert r["compile_s"] > 0 and r["loss"] > 0
  assert cases["dense"]["backends"] == "moe -, attention xla"
  assert cases["moe8"]["backends"] == "moe einsum, attention xla"
  assert cases["dense"]["scan_layers"] and not cases["v4_4k"]["scan_layers"]  # the smoke's V4 pair does not repeat
  layer = [r["layer_backend"].split()[0] for r in record["rows"] if "layer_backend" in r]
  assert layer == ["dense"] + [n for n in BACKENDS.names() if available(n)]  # the baseline first
  assert not [r for r in record["rows"] if "error" in r]
  assert all(not r["fallback"] for r in cases.values())
  assert accelerator.table(record).count("\n| ") == len(cases) + 1 + len(layer)
