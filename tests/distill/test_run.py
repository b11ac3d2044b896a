"""`moejax distill` end to end: specialists, student, report; resumable; config errors."""

import json
import os

import pytest

from moejax.cli import main
from moejax.config import ConfigError
from moejax.validation import validate
from moejax.distill.config import domain
from tests.distill.helpers import tiny_distill_cfg


@pytest.mark.parametrize("fields,message", [
    (dict(alpha=1.5), "distill.alpha=1.5 must be in [0, 1]"),
    (dict(temperature=0.0), "distill.temperature=0.0 must be > 0"),
    (dict(kl="js"), "distill.kl='js' is not one of ('forward', 'reverse')"),
    (dict(mode="online"), "distill.mode='online' is not one of"),
    (dict(teacher_source="disk"), "distill.teacher_source='disk' is not one of"),
    (dict(mode="on_policy", prompt_len=30, continuation_len=30), "prompt_len + continuation_len = 60 exceeds"),
    (dict(mode="on_policy", teacher_source="cache"), "needs teacher_source='cohost'"),
])
def test_invalid_distill_fields_are_named(fields, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                     .replace("+", r"\+")):
    validate(tiny_distill_cfg(**fields), 1)


def test_invalid_domains_are_named(tmp_path):
  cfg = tiny_distill_cfg()
  cfg.distill.domains.bad = domain("wikipedia", weight=0.0, stdlib_pkgs="x", teacher_workdir=str(tmp_path))
  cfg.distill.domains.more = domain("copy")
  cfg.train.batch_size = 3
  with pytest.raises(ConfigError) as err:
    validate(cfg, 1)
  for message in ("distill.domains has 4 domains but a micro-batch has 3 rows",
                  "distill.domains.bad.weight=0.0 must be > 0",
                  "distill.domains.bad.data has fields ['stdlib_pkgs'] that data.* does not",
                  "distill.domains.bad.data.source='wikipedia' is unknown",
                  f"distill.domains.bad.teacher_workdir={str(tmp_path)!r} has no config.json"):
    assert message in str(err.value)


@pytest.mark.slow
def test_distill_command_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
  """Two tiny specialists and a 2-step MoE student from the CLI; a second run with more
  student steps reuses the finished specialists and resumes the student."""
  config = tmp_path / "distill.py"
  config.write_text("from tests.distill.helpers import tiny_distill_cfg\n\n"
                    "def get_config():\n  c = tiny_distill_cfg()\n  c.train.steps = 2\n  c.train.eval_every = 2\n  c.train.batch_size = 8\n"
                    "  return c\n")
  workdir = tmp_path / "run"
  args = ["distill", "--config", str(config), "--workdir", str(workdir)]
  assert main(args) == 0
  report = (workdir / "distill_report.md").read_text()
  assert "| email |" in report and "| copy |" in report and "distill_experts_layer_1_mlp.png" in report
  assert (workdir / "distill_experts_layer_1_mlp.png").exists()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  for key in ("loss", "kl", "train_ce_email", "ce_email", "kl_copy", "teacher_ce_copy", "eval_kl"):
    assert key in records[-1] or key in records[0], key
  teacher_metrics = workdir / "teachers" / "email" / "metrics.jsonl"
  stamp = os.path.getmtime(teacher_metrics)

  assert main(args + ["--config.train.steps=3"]) == 0
  assert os.path.getmtime(teacher_metrics) == stamp  # the specialists were not retrained
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert "Distillation report" in capsys.readouterr().out
