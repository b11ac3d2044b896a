"""Long-context evaluation: generated examples, scoring, and the CLI report."""

import json
import re

import numpy as np
import pytest

from moejax import cli
from moejax.data import get_tokenizer
from moejax.evals.long_context import EVAL_TASKS, exact_match, haystack

BYTE = get_tokenizer("byte")


@pytest.mark.parametrize("task", ["passkey", "needle", "needle_multi", "mqar"])
@pytest.mark.parametrize("length", [400, 1000])
def test_examples_fit_and_answers_are_recoverable(task, length):
  rng = np.random.default_rng(0)
  doc = EVAL_TASKS.get(task)(BYTE, length, 0.5, rng)
  tokens, weights = doc["tokens"], doc["weights"]
  assert len(tokens) <= length
  text = BYTE.decode(tokens[1:])
  answer = BYTE.decode(tokens[weights > 0])
  if task.startswith("needle"):
    key = re.search(r"What is the special magic number for (\w+)\?", text).group(1)
    assert re.search(rf"The special magic number for {key} is (\d+)\.", text).group(1) == answer
    assert len(re.findall(r"The special magic number for", text)) == (4 if task == "needle_multi" else 1) + 1
  elif task == "passkey":
    assert re.search(r"The pass key is (\d+)\. Remember it", text).group(1) == answer


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_needle_sits_at_the_requested_depth(depth):
  doc = EVAL_TASKS.get("needle")(BYTE, 2000, depth, np.random.default_rng(1))
  text = BYTE.decode(doc["tokens"][1:])
  question = text.index("\nWhat is the special magic number")
  needle = text.index("\nThe special magic number for")
  needle_len = text.index(".\n", needle) + 2 - needle
  assert abs(needle / (question - needle_len) - depth) < 0.02


def test_haystack_is_held_out_stdlib_text():
  hay = BYTE.decode(haystack(BYTE, 5000)[:5000])
  assert "def " in hay or "import " in hay


def test_exact_match_needs_every_answer_token():
  correct = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0]], np.float32)
  weights = np.array([[0, 1, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], np.float32)
  expected = [all(c > 0.5 for c, w in zip(cr, wr) if w > 0) for cr, wr in zip(correct, weights)]
  np.testing.assert_array_equal(exact_match(correct, weights), expected)


@pytest.mark.parametrize("task", ["passkey", "perplexity"])
def test_eval_cli_writes_table_and_heatmap(tmp_path, capsys, task):
  wd = str(tmp_path / "run")
  base = ["--config", "configs/tiny.py:passkey", "--config.model.num_layers=1", "--config.model.d_model=32",
          "--config.data.seq_len=128", "--config.train.batch_size=8", "--config.train.steps=2",
          "--config.train.eval_every=0", "--workdir", wd]
  assert cli.main(["train", *base]) == 0
  rc = cli.main(["eval", *base, "--task", task, "--lengths", "128,256", "--depths", "0,1", "--samples", "8"])
  assert rc == 0, capsys.readouterr().err
  rows = json.loads((tmp_path / "run" / "evals" / f"{task}.json").read_text())
  if task == "passkey":
    assert {(r["length"], r["depth"]) for r in rows} == {(128, 0.0), (128, 1.0), (256, 0.0), (256, 1.0)}
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "run" / "evals" / "passkey.png").stat().st_size > 1000
  else:
    assert rows[0]["positions"] == "0-0" and rows[-1]["positions"].endswith("-255")
    assert all(r["loss"] > 0 for r in rows)
  assert "|" in capsys.readouterr().out
