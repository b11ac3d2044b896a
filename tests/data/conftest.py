"""Shared helpers for the data tests (no jax needed)."""

import pytest

from moejax.config import base_config
from tests.oracle import require


@pytest.fixture
def corpus():
  """200 short lines (all letters, digits and the tasks' punctuation) for tiny tokenizers."""
  return ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
          "The pass key is 0123456789. Remember it! What? ab:17 | cd:93",
          "all that glitters is not gold"] * 50


@pytest.fixture
def data_cfg():
  """A factory: the default ``data`` config section with some fields overridden."""

  def make(**overrides):
    cfg = base_config().data
    for key, value in overrides.items():
      cfg[key] = value
    return cfg

  return make


@pytest.fixture
def sentencepiece_model(tmp_path, corpus):
  """(path, SentencePieceProcessor) of a tiny BPE model trained offline on ``corpus``."""
  spm = require("sentencepiece")
  prefix = tmp_path / "sp"
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(prefix),
                                 vocab_size=60, model_type="bpe", minloglevel=2)
  return str(prefix) + ".model", spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
