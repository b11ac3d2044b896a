"""`moejax sweep` from a fresh workdir: runs, table, plots; a second call trains nothing.

Runs train on one of the 8 forced host devices (compiling for 8 costs more
than this test is about)."""

import csv

import pytest

from moejax import cli

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
          "--config.train.steps=4", "--config.train.async_checkpoint=False"]
  assert cli.main(argv) == 0
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
