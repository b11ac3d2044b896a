"""``moejax convert``: HF checkpoint -> workdir that train/eval resume from -> HF again."""

import json
import os
import shutil

import numpy as np
import pytest

from moejax import cli
from tests.interop import hf_models
from tests.oracle import require


@pytest.fixture(scope="module")
def converted_workdir(tmp_path_factory):
  """(HF model, ids, a converted workdir); tests that write into the workdir copy it first."""
  require("torch"), require("transformers")
  tmp_path = tmp_path_factory.mktemp("convert")
  model, ids = hf_models.build("mixtral-sliding")
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "workdir")
  model.save_pretrained(hf_dir)
  with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:  # a byte-level tokenizers file, copied along
    json.dump(_byte_tokenizer(), f)
  assert cli.main(["convert", "--from-hf", hf_dir, "--out", workdir]) == 0
  return model, ids, workdir


def _byte_tokenizer() -> dict:
  tokenizers = require("tokenizers")
  vocab = {chr(i) if 32 < i < 127 else f"<{i}>": i for i in range(256)}
  vocab["</s>"] = 256
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
  tok.add_special_tokens(["</s>"])
  return json.loads(tok.to_str())


def test_convert_from_hf_and_back_keeps_the_logits(converted_workdir, tmp_path):
  model, ids, workdir = converted_workdir
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["model"]["mlp_types"] == ["moe"] and saved["data"]["tokenizer"].endswith("tokenizer/tokenizer.json")
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]
  out = str(tmp_path / "hf_again")
  assert cli.main(["convert", "--to-hf", workdir, "--out", out]) == 0
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  again = hf_models.from_pretrained(out)
  np.testing.assert_array_equal(hf_models.logits(again, ids), hf_models.logits(model, ids))


def test_convert_errors_exit_2(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  assert cli.main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "w")]) == 2
  assert "model_type 'gpt2' is not supported" in capsys.readouterr().err


@pytest.mark.slow
def test_train_fine_tunes_a_converted_checkpoint(converted_workdir, tmp_path):
  workdir = str(tmp_path / "workdir")
  shutil.copytree(converted_workdir[2], workdir)
  overrides = ["--config.train.steps=2", "--config.train.batch_size=8", "--config.data.seq_len=32",
               "--config.train.eval_every=0", "--config.train.log_every=1"]
  assert cli.main(["train", "--config", os.path.join(workdir, "config.py"), "--workdir", workdir, *overrides]) == 0
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == [1, 2]  # resumed from the converted step 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0", "2"]


def test_convert_from_hf_refuses_what_training_could_not_honour(tmp_path, capsys):
  """A workdir is for fine-tuning: training-only settings moejax lacks, and a vocabulary below the byte
  tokenizer's without the model's own tokenizer, are refused (hf.load accepts both: test_hf.py)."""
  model, _ = hf_models.build("tester-mixtral")  # vocab 99, router_jitter_noise=0.1
  hf_dir = tmp_path / "hf"
  model.save_pretrained(str(hf_dir))
  args = ["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "w")]
  assert cli.main(args) == 2
  assert "router_jitter_noise=0.1 changes training" in capsys.readouterr().err
  config = json.loads((hf_dir / "config.json").read_text())
  (hf_dir / "config.json").write_text(json.dumps(dict(config, router_jitter_noise=0.0)))
  assert cli.main(args) == 2
  assert "vocabulary (vocab_size=99) is smaller than the 'byte' tokenizer's 259 ids" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
