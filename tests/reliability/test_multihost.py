"""Two real processes on localhost (4 CPU devices each) == one process with 8."""

import socket
import subprocess

import numpy as np
import pytest

from tests.reliability import harness

pytestmark = pytest.mark.slow(minutes=3)  # on 2 cores; the longest modules start first (tests/conftest.py)

SHARDED = ("--config.data.shards=2", "--config.mesh.data=-1", "--config.train.steps=6")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_eight_devices(tmp_path):
  single = str(tmp_path / "single")
  out = harness.run(single, *SHARDED, devices=8)
  assert out.returncode == 0, out.stderr

  multi, port = str(tmp_path / "multi"), _free_port()
  procs = [subprocess.Popen(
      harness.command(multi, *SHARDED, f"--config.distributed.coordinator_address=localhost:{port}",
                      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
      cwd=harness.REPO, env=harness.env(devices=4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]

  single_losses, multi_losses = harness.losses(single), harness.losses(multi)
  assert [s for s, _ in multi_losses] == [1, 2, 3, 4, 5, 6]
  # Cross-process reductions may order float sums differently: equal to ~1 ulp.
  np.testing.assert_allclose([l for _, l in multi_losses], [l for _, l in single_losses], rtol=1e-6)
  for a, b in zip(harness._leaves(harness.final_params(multi)), harness._leaves(harness.final_params(single))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Each process saved the positions of its own data shards ...
  assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "6" / "data").glob("shard_*")) == [
      "shard_0-of-2.json", "shard_1-of-2.json"]
  # ... so one process can carry on where the two stopped, as the single run does.
  for workdir in (single, multi):
    out = harness.run(workdir, *SHARDED, "--config.train.steps=8", devices=8)
    assert out.returncode == 0, out.stderr
  np.testing.assert_allclose([l for _, l in harness.losses(multi)[6:]],
                             [l for _, l in harness.losses(single)[6:]], rtol=1e-6)
