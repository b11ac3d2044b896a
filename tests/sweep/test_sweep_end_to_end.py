"""`moejax sweep` from a fresh workdir: runs, table, plots; a second call trains nothing.

Runs train on one of the 8 forced host devices (compiling for 8 costs more
than this test is about)."""

import csv
import json

import pytest

from moejax import cli
from moejax.config import ConfigError
from moejax.sweep.spec import QUICK_COMMON, load_sweep, main_runs, quick, run_config

SWEEP = '''
from moejax.sweep import Arm, Sweep

def get_sweep():
  return Sweep(
      arms={"adamw": Arm({"optim.name": "adamw"}, {"optim.learning_rate": [3e-3]}),
            "muon": Arm({"optim.name": "muon", "optim.muon.ns_dtype": "float32"}, {"optim.learning_rate": [1e-2]})},
      common={"train.eval_every": 2, "train.eval_batches": 1, "train.log_every": 2, "train.batch_size": 8,
              "data.seq_len": 32, "data.task_length": 16, "model.num_layers": 1, "model.d_model": 32,
              "model.ffn_dim": 64, "optim.warmup_steps": 1},
      seeds=(0,), baseline="adamw")
'''


@pytest.mark.slow
def test_two_by_one_sweep_end_to_end_and_resume(tmp_path, monkeypatch, capsys, devices):
  import moejax.train

  real_train = moejax.train.train
  monkeypatch.setattr(moejax.train, "train", lambda cfg, workdir: real_train(cfg, workdir, devices[:1]))
  sweep_file, workdir = tmp_path / "two.py", tmp_path / "sweep"
  sweep_file.write_text(SWEEP)
  argv = ["sweep", "--config", "configs/tiny.py:copy", "--sweep", str(sweep_file), "--workdir", str(workdir),
          "--config.train.log_every=1", "--config.train.steps=4", "--config.train.async_checkpoint=False"]
  assert cli.main(argv) == 0
  # --config.train.log_every=1 beats the sweep file's common log_every=2, and the report says so.
  with open(workdir / "runs" / "adamw" / "learning_rate=0.003_s0" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
  assert "'train.log_every': 1" in (workdir / "results.md").read_text()
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["arm"], r["steps"], r["optim.learning_rate"]) for r in rows] == [("adamw", "4", "0.003"), ("muon", "4", "0.01")]
  assert all(float(r["final_eval_loss"]) > 0 for r in rows)
  table = (workdir / "results.md").read_text()
  assert "| muon | learning_rate=0.01 |" in table and "| adamw | learning_rate=0.003 |" in table
  for png in ["loss_vs_steps.png", "loss_vs_tokens.png", "loss_vs_wall_time.png", "final_loss_vs_trial.png"]:
    assert (workdir / png).stat().st_size > 1000
  assert "# Sweep results" in capsys.readouterr().out

  monkeypatch.setattr(moejax.train, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
  assert cli.main(argv) == 0
  # Changing a run's settings in an existing workdir is refused, not silently mixed.
  assert cli.main(argv[:-2] + ["--config.train.steps=6", argv[-1]]) == 2
  assert "train.steps: 4 there, 6 now" in capsys.readouterr().err


def test_command_line_overrides_beat_the_sweep_file_and_arm_fields_are_refused(tmp_path, capsys):
  sweep = load_sweep("experiments/sweeps/optimizers.py")
  assert sweep.common["train.steps"] == 200
  run = main_runs(sweep)[0]
  assert run.overrides(sweep, 0, {"train.steps": 7})["train.steps"] == 7
  argv = ["sweep", "--config", "configs/tiny.py", "--sweep", "experiments/sweeps/optimizers.py",
          "--workdir", str(tmp_path / "w"), "--config.optim.learning_rate=0.1"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "--config.optim.learning_rate (set by arm 'adamw')" in err
  assert not (tmp_path / "w" / "runs").exists()


def test_quick_sweep_is_one_short_trial_per_arm():
  from moejax.config import load_config

  sweep = load_sweep("experiments/sweeps/optimizers.py")
  small = quick(sweep)
  runs = main_runs(small)
  assert [r.arm for r in runs] == ["adamw", "muon", "lion", "adafactor"] and small.budgets == ()
  assert [r.trial["optim.learning_rate"] for r in runs] == [
      arm.grid["optim.learning_rate"][1] for arm in (sweep.arms[r.arm] for r in runs)]
  cfgs = [run_config(load_config("configs/tiny.py"), r.overrides(small, 0), r.name) for r in runs]
  assert {(c.train.steps, c.train.eval_every, c.seed) for c in cfgs} == {(QUICK_COMMON["train.steps"], 20, 0)}
  with pytest.raises(ConfigError, match="set by arm"):
    from moejax.sweep.spec import check_command_line

    check_command_line(small, {"optim.name": "sgd"})
