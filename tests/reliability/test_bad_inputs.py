"""Table of bad inputs: each exits with status 2, a message naming the problem
and the fix, no traceback, before compiling, and writes nothing."""

import json
import os

import pytest

from moejax import cli
from moejax.config import ConfigError, base_config, to_json
from moejax.train import check_workdir

BASE = ["train", "--config", "configs/tiny.py", "--config.model.num_layers=1", "--config.model.d_model=32",
        "--config.data.seq_len=32", "--config.train.batch_size=8", "--config.train.steps=2",
        "--config.train.eval_every=0"]


def _files(tmp_path, name, content):
  path = tmp_path / "data" / name
  path.parent.mkdir(exist_ok=True)
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  return ["--config.data.source=files", f"--config.data.files={path}"]


CASES = {
    "unknown field": (lambda p: ["--config.train.stepz=3"], 'Did you mean "steps"'),
    "ill-typed value": (lambda p: ["--config.train.steps=many"], "--config.train.steps=many"),
    "heads vs width": (lambda p: ["--config.model.num_heads=3"], "model.num_heads=3 does not divide model.d_model=32"),
    "kv heads": (lambda p: ["--config.model.num_kv_heads=3"], "model.num_kv_heads=3 does not divide model.num_heads=4"),
    "unknown attention": (lambda p: ["--config.model.attention_types=('flash',)"], "unknown attention type 'flash'"),
    "schedule length": (lambda p: ["--config.model.attention_types=('dense','dense')"],
                        "model.attention_types has 2 entries but model.num_layers=1"),
    "mesh vs devices": (lambda p: ["--config.mesh.data=3"], "multiply to 3 but there are 8 devices"),
    "batch vs mesh": (lambda p: ["--config.train.batch_size=4"], "must divide over mesh.data*mesh.fsdp*mesh.expert=8"),
    "nonfinite policy": (lambda p: ["--config.train.nonfinite=ignore"], "train.nonfinite='ignore' is not one of"),
    "bad process id": (lambda p: ["--config.distributed.coordinator_address=localhost:1",
                                  "--config.distributed.num_processes=2", "--config.distributed.process_id=2"],
                       "distributed.process_id=2 must be in [0, distributed.num_processes=2)"),
    "missing config file": (lambda p: ["--config", "configs/nope.py"], "nope.py"),
    "no data files": (lambda p: ["--config.data.source=files", f"--config.data.files={p}/none/*.txt"],
                      "matched no file"),
    "empty data file": (lambda p: _files(p, "empty.txt", "   \n"), "holds no documents"),
    "non-UTF-8 text": (lambda p: _files(p, "latin1.txt", "caf\xe9".encode("latin-1") + b" " * 100),
                       "is not UTF-8 (invalid byte 0xe9 at byte offset 3)"),
    "bad JSONL line": (lambda p: _files(p, "x.jsonl", '{"text": "a"}\n{oops\n'), "line 2 is not valid JSON"),
    "seq_len beyond data": (lambda p: _files(p, "tiny.txt", "hello"), "data.seq_len=32 is longer than the whole"),
    "task longer than rows": (lambda p: ["--config.data.source=copy", "--config.data.task_length=100"],
                              "data.task_length=100 must be in [1, data.seq_len + 1 = 33]"),
    "hyper-connection streams": (lambda p: ["--config.model.hc.streams=0"], "model.hc.streams=0 must be >= 1"),
    "tokenizer file missing": (lambda p: [f"--config.data.tokenizer={p}/sp.model"], "data.tokenizer"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, name):
  make_args, message = CASES[name]
  workdir = tmp_path / "run"
  rc = cli.main([*BASE, *make_args(tmp_path), "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert message in err, err
  assert "Traceback" not in err
  assert not workdir.exists()


def test_workdir_of_another_model_is_refused_untouched(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert cli.main([*BASE, "--workdir", str(workdir)]) == 0
  before = sorted(os.listdir(workdir)), (workdir / "config.json").read_text()
  rc = cli.main([*BASE, "--config.model.d_model=64", "--workdir", str(workdir)])
  err = capsys.readouterr().err
  assert rc == 2
  assert "holds checkpoints of a different model: model.d_model is 32 there but 64 now" in err
  assert (sorted(os.listdir(workdir)), (workdir / "config.json").read_text()) == before


def test_workdir_from_before_a_new_field_resumes_at_its_default(tmp_path):
  """A config.json saved before model.hc / model.mtp existed matches their
  defaults (the checkpoints are unchanged), and only those."""
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)
  saved = json.loads(to_json(base_config()))
  del saved["model"]["hc"], saved["model"]["mtp"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  check_workdir(base_config(), str(tmp_path))
  cfg = base_config()
  cfg.model.hc.streams = 4
  with pytest.raises(ConfigError, match="model.hc is .* there but"):
    check_workdir(cfg, str(tmp_path))
