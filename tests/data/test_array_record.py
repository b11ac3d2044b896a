"""``moejax data prepare`` + ``data.source="array_record"`` against independent references:
the in-memory ``files`` pipeline, ``transformers``' tokenizer, the raw ArrayRecord records."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from moejax.config import ConfigError, base_config, validate
from moejax.data import ShardedBatches, make_iterator
from moejax.data.array_record import MANIFEST
from moejax.data.prepare import PrepareError, prepare

WORDS = ["alpha", "beta", "gamma", "def", "x = 1", "return", "λ", "ünïcode"]


def _write_corpus(directory, files=3, docs=60, seed=0, prefix="doc"):
  """``files`` JSONL files of distinct documents; returns {path: [texts]}."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  corpus = {}
  for f in range(files):
    texts = [f"{prefix} {f}-{i} " + " ".join(rng.choice(WORDS, rng.integers(1, 40))) for i in range(docs)]
    path = os.path.join(directory, f"part{f}.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
      for i, t in enumerate(texts):
        fh.write(json.dumps({"text": t, "id": i}) + "\n")
        if i % 17 == 0:
          fh.write("\n")  # blank lines are skipped, as in the files source
    corpus[path] = texts
  return corpus


def _records(directory, split):
  with open(os.path.join(directory, MANIFEST)) as f:
    manifest = json.load(f)
  out = []
  for shard in manifest["splits"][split]["shards"]:
    reader = ArrayRecordReader(os.path.join(directory, shard["file"]))
    out += [np.frombuffer(r, manifest["dtype"]).tolist() for r in reader.read_all()]
    reader.close()
  return out


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                  for x, y in zip(a, b))


def _cfg(**data):
  cfg = base_config()
  cfg.model.vocab_size = 259
  cfg.train.eval_every = 0
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


def test_round_trip_equals_the_files_pipeline(tmp_path):
  corpus = _write_corpus(tmp_path / "text")
  out = str(tmp_path / "shards")
  manifest = prepare([str(tmp_path / "text" / "*.jsonl")], "byte", out, val_fraction=0.0, shard_tokens=700,
                     show_progress=False)
  texts = [t for path in sorted(corpus) for t in corpus[path]]
  assert _records(out, "train") == [[1] + [b + 3 for b in t.encode()] + [2] for t in texts]
  assert manifest["splits"]["train"]["documents"] == len(texts) and len(manifest["splits"]["train"]["shards"]) > 3
  files = _cfg(source="files", files=str(tmp_path / "text" / "*.jsonl"), val_fraction=0.0, seq_len=64).data
  shards = _cfg(source="array_record", path=out, seq_len=64).data
  for seed in (0, 3):
    want = _take(make_iterator(files, split="train", batch_size=4, seed=seed), 40)
    assert _same(_take(make_iterator(shards, split="train", batch_size=4, seed=seed), 40), want)


def test_split_is_by_document_text_and_stable_under_adding_files(tmp_path):
  corpus = _write_corpus(tmp_path / "a", files=2, docs=150)
  _write_corpus(tmp_path / "b", files=1, docs=150, seed=1, prefix="new")
  one = prepare([str(tmp_path / "a" / "*.jsonl")], "byte", str(tmp_path / "o1"), val_fraction=0.2,
                show_progress=False)
  prepare([str(tmp_path / "a" / "*.jsonl"), str(tmp_path / "b" / "*.jsonl")], "byte", str(tmp_path / "o2"),
          val_fraction=0.2, show_progress=False)
  split = {s: {o: set(map(tuple, _records(tmp_path / o, s))) for o in ("o1", "o2")} for s in ("train", "validation")}
  assert 0.1 < len(split["validation"]["o1"]) / 300 < 0.3
  assert split["validation"]["o1"] <= split["validation"]["o2"] and split["train"]["o1"] <= split["train"]["o2"]
  assert not split["train"]["o2"] & split["validation"]["o2"]
  import hashlib
  for source in one["sources"]:
    with open(source["path"], "rb") as f:
      assert source["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert source["documents"] == len(corpus[source["path"]])
