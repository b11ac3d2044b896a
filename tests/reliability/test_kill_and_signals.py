"""Real processes killed with SIGKILL, or stopped with SIGTERM/SIGINT."""

import os
import signal
import subprocess
import time

import pytest

from tests.reliability import harness

pytestmark = pytest.mark.slow(minutes=5)  # on 2 cores; the longest modules start first (tests/conftest.py)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the harness config."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  out = harness.run(workdir)
  assert out.returncode == 0, out.stderr
  return workdir


@pytest.mark.parametrize("seed,during_save,async_save", [
    (0, False, True), (1, True, True), (2, True, True), (3, False, False)])
def test_kill_9_then_rerun_is_exact(reference, tmp_path, seed, during_save, async_save):
  r = harness.kill_trial(reference, str(tmp_path / "run"), seed, during_save, async_save)
  assert r["killed_at"] is not None, "the run ended before the kill"
  assert r["exact"], r["stderr"]
  # The rerun reports restoring the newest checkpoint that was complete at the kill, so it lost at most one
  # checkpoint interval (plus, with asynchronous saves, the save in flight at the kill).
  assert r["resumed_from"] == r["finished_before_kill"]
  assert r["lost_steps"] <= (harness.EVERY if not async_save else 2 * harness.EVERY - 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_a_checkpoint_and_exit_0(reference, tmp_path, sig):
  workdir = str(tmp_path / "run")
  proc = harness.start(workdir)
  deadline = time.time() + 300
  while len(harness.records(workdir)) < 6 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(sig)
  signalled_at = time.time()
  try:
    proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("the run did not stop within 60 s of the signal")
  assert proc.returncode == 0, proc.stderr.read()
  assert time.time() - signalled_at < 60
  last_logged = harness.records(workdir)[-1]["step"]
  assert last_logged < harness.STEPS
  assert harness.finished_steps(workdir)[-1] == last_logged  # checkpoint of the step it stopped at
  out = harness.run(workdir)
  assert out.returncode == 0, out.stderr
  assert harness.losses(workdir) == harness.losses(reference)
  # The rerun restored the checkpoint written at the signal: no step lost.
  assert (harness.runs(workdir)[-1]["status"], harness.runs(workdir)[-1]["restored_step"]) == ("resumed", last_logged)
  assert f"resumed from step {last_logged} of {harness.STEPS}" in out.stderr


def test_partial_checkpoint_is_reported_and_set_aside(reference, tmp_path):
  """A leftover temporary directory (a save cut short) is moved aside, not used."""
  workdir = tmp_path / "run"
  out = harness.run(str(workdir), "--config.train.steps=8")
  assert out.returncode == 0, out.stderr
  fake = workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1700000000"
  (fake / "state").mkdir(parents=True)
  (fake / "state" / "garbage").write_bytes(os.urandom(64))
  out = harness.run(str(workdir), "--config.train.steps=8")
  assert out.returncode == 0
  assert "unfinished save" in out.stderr
  assert "already finished at step 8" in out.stderr and harness.runs(str(workdir))[-1]["status"] == "finished"
  assert (workdir / "checkpoints_set_aside" / fake.name / "state" / "garbage").exists()
  assert not fake.exists()
