"""The ``moejax`` command end to end, in real subprocesses (one CPU device)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.reliability import harness

pytestmark = pytest.mark.slow(minutes=4)  # on 2 cores; the longest modules start first (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "configs/tiny.py", "--config.model.num_layers=2", "--config.model.d_model=64",
         "--config.data.seq_len=64", "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.train.eval_every=0"]


def _env():
  return harness.env()  # one CPU device, the suite's compile flags


def moejax(*args, **kwargs):
  return subprocess.run([sys.executable, "-m", "moejax.cli", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=600, **kwargs)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _runs(workdir):
  with open(os.path.join(workdir, "runs.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_then_eval_then_extend(tmp_path):
  wd = str(tmp_path / "run")
  out = moejax("train", *SMALL, "--config.train.steps=4", "--config.train.checkpoint_every=2",
               "--config.train.eval_every=2", "--config.train.eval_batches=1", "--workdir", wd)
  assert out.returncode == 0, out.stderr
  assert [s for s, _ in _losses(wd)] == [1, 2, 3, 4]
  assert {"config.json", "metrics.jsonl", "tensorboard", "checkpoints", "loss_curve.png"} <= set(os.listdir(wd))
  assert "moejax train: starting fresh: step 0 of 4" in out.stderr
  # The closing summary: losses with units, where the files are, what to run next.
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    evals = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]
  best = min(evals)
  assert f"best eval loss (step {2 + 2 * evals.index(best)}): {best:.4f} nats/token = {best / math.log(2):.4f} " \
         "bits/byte" in out.stderr
  assert f"final eval loss (step 4): {evals[-1]:.4f} nats/token" in out.stderr
  for where in [os.path.join(wd, "checkpoints"), os.path.join(wd, "metrics.jsonl"), os.path.join(wd, "loss_curve.png"),
                f"tensorboard --logdir {os.path.join(wd, 'tensorboard')}", f"moejax eval --workdir {wd}",
                f"moejax generate --workdir {wd}", f"moejax convert --to-hf {wd}"]:
    assert where in out.stderr, where
  assert _runs(wd)[-1]["restored_step"] == 0

  # eval without --config reads the run's config.json and says so.
  out = moejax("eval", "--workdir", wd)
  assert out.returncode == 0, out.stderr
  assert f"using config {os.path.join(wd, 'config.json')}" in out.stderr
  result = json.loads(out.stdout)
  assert result["step"] == 4 and result["eval_loss"] > 0

  # Raising train.steps on a finished run: resumed from its last step, with a warning about the schedule.
  out = moejax("train", *SMALL, "--config.train.steps=6", "--config.train.checkpoint_every=2", "--workdir", wd)
  assert out.returncode == 0, out.stderr
  assert f"resumed from step 4 of 6 (checkpoint {os.path.join(os.path.abspath(wd), 'checkpoints', '4')})" in out.stderr
  assert "train.steps changed from 4 to 6" in out.stderr and "docs/cli.md" in out.stderr
  assert [(r["status"], r["restored_step"]) for r in _runs(wd)] == [("fresh", 0), ("resumed", 4)]
  assert [s for s, _ in _losses(wd)] == [1, 2, 3, 4, 5, 6]

  # Every checkpoint unreadable: exit 2, a message naming them and the way out, nothing changed, no asyncio noise.
  from tests.reliability.test_state_faults import _corrupt

  ckpts = sorted(n for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
  for name in ckpts:
    _corrupt(tmp_path / "run" / "checkpoints" / name)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    metrics_before = f.read()
  out = moejax("train", *SMALL, "--config.train.steps=8", "--config.train.checkpoint_every=2", "--workdir", wd)
  assert out.returncode == 2, out.stderr
  assert "--start_fresh" in out.stderr and all(os.path.join("checkpoints", n) in out.stderr for n in ckpts)
  assert "asyncio" not in out.stderr and "Traceback" not in out.stderr and "pybind11" not in out.stderr
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    assert f.read() == metrics_before
  assert not os.path.exists(os.path.join(wd, "checkpoints_set_aside"))


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

  on_disk, killed_at = max(int(d) for d in os.listdir(ckpts) if d.isdigit()), _losses(killed)[-1][0]
  out = moejax("train", *args, "--workdir", killed)
  assert out.returncode == 0, out.stderr
  assert _losses(killed) == _losses(straight)
  # The rerun restored the newest checkpoint complete at the kill (Orbax renames a save into place only when
  # it is whole), so it lost at most one interval plus the asynchronous save in flight.
  assert (_runs(killed)[-1]["status"], _runs(killed)[-1]["restored_step"]) == ("resumed", on_disk)
  assert 10 <= on_disk and killed_at - on_disk < 2 * 5
  assert f"resumed from step {on_disk} of 30" in out.stderr


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


def test_unknown_command_suggests_the_closest():
  out = moejax("trian", "--config", "configs/tiny.py")
  assert out.returncode == 2
  assert "unknown command 'trian'; did you mean 'train'?" in out.stderr


@pytest.mark.parametrize("command,flag", [("train", "--start_fresh"), ("eval", "--task"), ("generate", "--prompt"),
                                          ("sweep", "--quick"), ("convert", "--to-hf"), ("config", "--config")])
def test_every_command_has_help_with_its_flags_and_examples(command, flag):
  out = moejax(command, "--help")
  assert out.returncode == 0, out.stderr
  assert flag in out.stdout and f"moejax {command} " in out.stdout.split("examples:")[1]


def test_config_prints_the_resolved_config():
  out = moejax("config", "--config", "configs/tiny_moe.py", "--config.train.steps=7")
  assert out.returncode == 0, out.stderr
  cfg = json.loads(out.stdout)
  assert cfg["train"]["steps"] == 7 and cfg["model"]["moe"]["num_experts"] > 1


def test_workdir_under_a_file_is_a_one_line_error(tmp_path):
  (tmp_path / "file").write_text("x")
  for wd in [tmp_path / "file", tmp_path / "file" / "run"]:
    out = moejax("train", *SMALL, "--workdir", str(wd))
    assert out.returncode == 2
    assert "not a directory" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_workdir_in_an_immutable_directory_is_a_one_line_error(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
    pytest.skip("chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE)")
  try:
    out = moejax("train", *SMALL, "--workdir", str(locked / "run"))
  finally:
    subprocess.run(["chattr", "-i", str(locked)], check=True)
  assert out.returncode == 2
  assert "not writable (Operation not permitted)" in out.stderr and "Traceback" not in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_of_a_missing_workdir_create_nothing(tmp_path, command):
  wd = tmp_path / "missing"
  out = moejax(command, *SMALL, "--prompt", "x", "--workdir", str(wd)) if command == "generate" else moejax(
      command, *SMALL, "--workdir", str(wd))
  assert out.returncode == 2
  assert "no checkpoint in" in out.stderr
  assert not wd.exists()


def test_quickstart_notebook_finds_the_repository_from_its_own_location(tmp_path):
  notebook = os.path.join(REPO, "colab", "quickstart.ipynb")
  with open(notebook) as f:
    install_cell = "".join(json.load(f)["cells"][1]["source"])
  assert "<your" not in install_cell  # no placeholder to fill in
  env = dict(_env(), JPY_SESSION_NAME=notebook)
  out = subprocess.run([sys.executable, "-c", install_cell], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == f"moejax repository: {REPO}"


def test_moe_run_prints_a_router_summary_per_layer_at_eval_steps(tmp_path):
  wd = str(tmp_path / "moe")
  out = moejax("train", "--config", "configs/tiny_moe.py", "--config.data.seq_len=64", "--config.train.batch_size=8",
               "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.eval_batches=1",
               "--config.train.log_every=1", "--workdir", wd)
  assert out.returncode == 0, out.stderr
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f][-1]
  layers = sorted(k.rsplit("/", 1)[0] for k in last if k.endswith("/expert_load"))
  assert layers
  for layer in layers:
    load = last[f"{layer}/expert_load"]
    dead = [i for i, x in enumerate(load) if x < 0.01]
    line = (f"step 2 router {layer}: load max/mean {last[f'{layer}/load_max_over_mean']:.2f}, "
            f"min/mean {last[f'{layer}/load_min_over_mean']:.2f}, dead experts "
            f"{len(dead)}/{len(load)}{' ' + str(dead) if dead else ''}, "
            f"dropped {last[f'{layer}/dropped_fraction']:.1%}")
    assert line in out.stderr, (line, out.stderr[-3000:])
    # Raw and weighted balance terms are both logged; the weighted ones are what entered the objective.
    assert f"{layer}/z_loss" in last and f"{layer}/z_loss_weighted" in last


@pytest.mark.parametrize("args,message", [
    (["--topology", "v9:2x2"], "unknown chip 'v9'"),
    ([], "--topology is required"),
])
def test_compile_bad_topology_fails_cleanly(args, message):
  result = moejax("compile", "--config", "configs/tiny.py", *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr
