"""Synthetic tasks: brute-force parsers recover each answer from the context alone."""

import re

import numpy as np
import pytest

from moejax.data import SOURCES, get_tokenizer

BYTE = get_tokenizer("byte")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")


def _source(data_cfg, task, length, split="train", tokenizer=BYTE):
  cfg = data_cfg(source=task, task_length=length, seq_len=max(length, 256))
  return SOURCES.get(task)(cfg, split, tokenizer)


def _split_answer(doc):
  """(context text, answer text, the answer's token span) of a byte-level document."""
  tokens, weights = doc["tokens"], doc["weights"]
  assert tokens[0] == BYTE.bos_id and weights[0] == 0
  assert set(np.unique(weights)) <= {0.0, 1.0}
  answer_span = np.flatnonzero(weights)
  return BYTE.decode(tokens[weights == 0]), BYTE.decode(tokens[answer_span]), answer_span


def check_passkey(doc, length):
  context, answer, _ = _split_answer(doc)
  m = re.fullmatch(r"(.*) The pass key is (\d{5})\. Remember it\.(.*) What is the pass key\? "
                   r"The pass key is ", context, flags=re.S)
  assert m, context
  before, key, after = m.groups()
  assert answer == key
  assert np.all(doc["weights"][-5:] == 1)  # the answer ends the document
  cycle = "".join(" " + s for s in FILLER) * (length // 10 + 1)
  assert (before + after) == cycle[:len(before + after)]  # only filler around the key
  assert before == "" or before.endswith(".")  # inserted at a sentence boundary
  assert len(doc["tokens"]) == length
  return len(before) / max(1, len(before + after))


def check_mqar(doc, length):
  text = BYTE.decode(doc["tokens"])
  pairs_text, queries_text = text.split(" |")
  for part in (pairs_text, queries_text):
    assert re.fullmatch(r"( [a-z]+:\d\d)+", part)
  pairs = re.findall(r" ([a-z]+):(\d\d)", pairs_text)
  keys = [k for k, _ in pairs]
  assert len(set(keys)) == len(keys)
  table = dict(pairs)
  expected = np.zeros(len(doc["tokens"]), bool)
  queried = []
  for m in re.finditer(r" ([a-z]+):(\d\d)", queries_text):
    assert table[m.group(1)] == m.group(2)  # the answer is the value given earlier
    queried.append(m.group(1))
    start = 1 + len(pairs_text) + len(" |") + m.start(2)
    expected[start:start + 2] = True
  assert queried and len(set(queried)) == len(queried)
  assert np.array_equal(doc["weights"] > 0, expected)
  # Generation stops at the first pair (twice its tokens if queried) that does not fit.
  assert length - 2 * len(" ab:17".replace("ab", keys[0])) < len(doc["tokens"]) <= length
  return len(queried) / len(pairs)


def check_copy(doc, length):
  text = BYTE.decode(doc["tokens"])
  m = re.fullmatch(r"([a-z]+)\|([a-z]+)", text)
  assert m and m.group(1) == m.group(2)
  _, answer, span = _split_answer(doc)
  assert answer == m.group(1)
  assert np.array_equal(span, np.arange(len(doc["tokens"]) - len(answer), len(doc["tokens"])))
  assert length - 1 <= len(doc["tokens"]) <= length
  return 0.0


CHECKS = {"passkey": check_passkey, "mqar": check_mqar, "copy": check_copy}


@pytest.mark.parametrize("length", [128, 1000, 4096])
@pytest.mark.parametrize("task", sorted(CHECKS))
def test_answer_is_recoverable_from_context(data_cfg, task, length):
  source = _source(data_cfg, task, length)
  assert len(source) == 2**20
  stats = [CHECKS[task](source[i], length) for i in range(0, 2**20, 2**20 // 40)]
  if task == "passkey":  # the key moves through the context
    assert min(stats) < 0.2 and max(stats) > 0.7
  if task == "mqar":  # about half the keys are queried
    assert 0.3 < np.mean(stats) < 0.7


@pytest.mark.parametrize("task", sorted(CHECKS))
def test_examples_are_pure_functions_of_split_and_index(data_cfg, task):
  train, train2 = _source(data_cfg, task, 128), _source(data_cfg, task, 128)
  val = _source(data_cfg, task, 128, split="validation")
  for i in (0, 1, 12345):
    assert np.array_equal(train[i]["tokens"], train2[i]["tokens"])
    assert not np.array_equal(train[i]["tokens"], val[i]["tokens"])
    assert not np.array_equal(train[i]["tokens"], train[i + 1]["tokens"])


@pytest.mark.parametrize("task", sorted(CHECKS))
def test_length_errors_name_the_fields(data_cfg, task):
  with pytest.raises(ValueError, match=r"data\.task_length=300 .*data\.seq_len >= 299"):
    SOURCES.get(task)(data_cfg(source=task, task_length=300, seq_len=256), "train", BYTE)
  with pytest.raises(ValueError, match=r"data\.task_length=3 is too short"):
    SOURCES.get(task)(data_cfg(source=task, task_length=3), "train", BYTE)


def _answers_in_context(task, context, answer):
  """Brute-force recall on space-free decoded text (SentencePiece re-spaces pieces)."""
  if task == "passkey":
    return re.findall(r"passkeyis(\d{5})\.Rememberit", context) == [answer]
  if task == "copy":
    return context == answer + "|"
  table = dict(re.findall(r"([a-z]+):(\d\d)", context.split("|")[0]))
  queries = re.findall(r"([a-z]+):", context.split("|")[1])
  return "".join(table[k] for k in queries) == answer


@pytest.mark.parametrize("task", sorted(CHECKS))
def test_tasks_work_with_sentencepiece(data_cfg, sentencepiece_model, task):
  path, reference = sentencepiece_model
  source = _source(data_cfg, task, 200, tokenizer=get_tokenizer(path))
  for i in range(20):
    tokens, weights = source[i]["tokens"], source[i]["weights"]
    assert tokens[0] == reference.bos_id() and len(tokens) <= 200
    answer = reference.decode(tokens[weights > 0].tolist()).replace(" ", "")
    context = reference.decode(tokens[weights == 0].tolist()).replace(" ", "")
    assert answer and _answers_in_context(task, context, answer), (context, answer)
