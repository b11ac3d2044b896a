"""The ``moejax`` command end to end, in real subprocesses (one CPU device)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "configs/tiny.py", "--config.model.num_layers=2", "--config.model.d_model=64",
         "--config.data.seq_len=64", "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.train.eval_every=0"]


def _env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return env


def moejax(*args, **kwargs):
  return subprocess.run([sys.executable, "-m", "moejax.cli", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600, **kwargs)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_train_then_eval(tmp_path):
  wd = str(tmp_path / "run")
  out = moejax("train", *SMALL, "--config.train.steps=4", "--config.train.checkpoint_every=2", "--workdir", wd)
  assert out.returncode == 0, out.stderr
  assert [s for s, _ in _losses(wd)] == [1, 2, 3, 4]
  assert {"config.json", "metrics.jsonl", "tensorboard", "checkpoints"} <= set(os.listdir(wd))
  out = moejax("eval", *SMALL, "--config.train.steps=4", "--config.train.eval_batches=2", "--workdir", wd)
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout)
  assert result["step"] == 4 and result["eval_loss"] > 0


def test_kill_9_then_rerun_resumes_exactly(tmp_path):
  args = [*SMALL, "--config.train.steps=30", "--config.train.checkpoint_every=5"]
  straight = str(tmp_path / "straight")
  assert moejax("train", *args, "--workdir", straight).returncode == 0

  killed = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, "-m", "moejax.cli", "train", *args, "--workdir", killed],
                          cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = os.path.join(killed, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= 10 for d in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(_losses(killed)) < 30

  out = moejax("train", *args, "--workdir", killed)
  assert out.returncode == 0, out.stderr
  assert _losses(killed) == _losses(straight)


@pytest.mark.parametrize("override,message", [
    ("--config.train.stepz=3", 'Did you mean "steps"'),
    ("--config.train.steps=many", "--config.train.steps=many"),
    ("--config.model.num_heads=3", "model.num_heads=3 does not divide model.d_model=64"),
])
def test_bad_overrides_fail_cleanly_and_write_nothing(tmp_path, override, message):
  wd = tmp_path / "run"
  out = moejax("train", *SMALL, override, "--workdir", str(wd))
  assert out.returncode == 2
  assert message in out.stderr
  assert "Traceback" not in out.stderr
  assert not wd.exists()


def test_usage_without_command():
  out = moejax()
  assert out.returncode == 2 and "usage: moejax" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--topology", "v9:2x2"], "unknown chip 'v9'"),
    ([], "--topology is required"),
])
def test_compile_bad_topology_fails_cleanly(args, message):
  result = moejax("compile", "--config", "configs/tiny.py", *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr
