"""Tokenizers against independent references: Python's UTF-8 codec and the libraries."""

import sys

import numpy as np
import pytest

from moejax.data import get_tokenizer, make_iterator, tokenizer_vocab_size
from tests.oracle import require

TEXTS = ["", "hello world", "naïve café — ünïcödé ✓ 日本語 🙂", "tabs\tand\nnewlines\r\n",
         "\x00\x7f"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_matches_utf8(text):
  tok = get_tokenizer("byte")
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.tolist() == [b + 3 for b in text.encode("utf-8")]
  assert tok.decode(ids) == text


def test_byte_tokenizer_specials():
  tok = get_tokenizer("byte")
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  assert tokenizer_vocab_size("byte") == 259
  ids = np.concatenate([[tok.bos_id], tok.encode("ok"), [tok.eos_id, tok.pad_id]])
  assert tok.decode(ids) == "ok"


@pytest.mark.parametrize("spec, error", [("bpe", ValueError), ("", ValueError),
                                         ("/nonexistent/t.model", OSError),
                                         ("/nonexistent/t.json", OSError)])
def test_bad_spec_names_the_field(spec, error):
  with pytest.raises(error, match=r"data\.tokenizer.*byte"):
    get_tokenizer(spec)


@pytest.mark.parametrize("module, suffix", [("sentencepiece", ".model"), ("tokenizers", ".json")])
def test_missing_package_says_how_to_install(tmp_path, monkeypatch, module, suffix):
  path = tmp_path / f"tok{suffix}"
  path.write_text("{}")
  monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
  with pytest.raises(ImportError, match=f"pip install {module}"):
    get_tokenizer(str(path))


def test_sentencepiece_matches_library(sentencepiece_model, corpus):
  path, reference = sentencepiece_model
  tok = get_tokenizer(path)
  assert tok.vocab_size == tokenizer_vocab_size(path) == reference.get_piece_size() == 60
  assert (tok.bos_id, tok.eos_id) == (reference.bos_id(), reference.eos_id())
  for text in corpus[:4] + ["unseen words like zebra"]:
    assert tok.encode(text).tolist() == reference.encode(text)
    assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text))
  assert tok.decode(tok.encode(corpus[0])) == corpus[0]


@pytest.fixture
def hf_tokenizer_file(tmp_path, corpus):
  tokenizers = require("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  path = tmp_path / "tok.json"
  tok.save(str(path))
  return str(path), tokenizers.Tokenizer.from_file(str(path))


def test_hf_tokenizers_matches_library(hf_tokenizer_file, corpus):
  path, reference = hf_tokenizer_file
  tok = get_tokenizer(path)
  assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == tuple(
      reference.token_to_id(t) for t in ("<pad>", "<s>", "</s>"))
  for text in corpus[:4] + ["unseen words like zebra, ünïcödé"]:
    assert tok.encode(text).tolist() == reference.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


def test_pipeline_with_sentencepiece(sentencepiece_model, corpus, tmp_path, data_cfg):
  path, reference = sentencepiece_model
  texts = [" ".join(corpus[:40]), " ".join(corpus[40:80])]
  for name, text in zip("ab", texts):
    (tmp_path / f"{name}.txt").write_text(text)
  cfg = data_cfg(source="files", files=str(tmp_path / "*.txt"), tokenizer=path, seq_len=32,
                 val_fraction=0.5)
  batch = next(make_iterator(cfg, split="train", batch_size=4, seed=0))
  docs = [[reference.bos_id(), *reference.encode(t), reference.eos_id()] for t in texts]
  for row in range(4):
    inputs = batch["inputs"][row][batch["segment_ids"][row] == 1].tolist()
    assert any(doc[i:i + len(inputs)] == inputs for doc in docs for i in range(len(doc)))
