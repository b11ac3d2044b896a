"""The packed-batch pipeline against a brute-force reconstruction of the documents."""

import collections
import json

import numpy as np
import pytest

from moejax.data import make_iterator
from moejax.data.pipeline import build_dataset
from moejax.data.source import document

BASE = 100_000  # token = doc * BASE + position, so every token names its origin


def _numbered_docs(num_docs, max_len, seed=0):
  """Documents whose tokens encode (document, position); random lengths and 0/1 weights."""
  rng = np.random.default_rng(seed)
  docs = []
  for d in range(num_docs):
    n = int(rng.integers(1, max_len + 1))
    docs.append(document(d * BASE + np.arange(n), rng.integers(0, 2, n)))
  return docs


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _check_batch_structure(batch, batch_size, seq_len):
  """Shapes, dtypes, and per-row segment layout: 1..k contiguous, then padding."""
  dtypes = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
            "segment_ids": np.int32, "positions": np.int32}
  assert set(batch) == set(dtypes)
  for name, dtype in dtypes.items():
    assert batch[name].shape == (batch_size, seq_len) and batch[name].dtype == dtype, name
  for seg_row, pos_row in zip(batch["segment_ids"], batch["positions"]):
    used = seg_row[seg_row > 0]
    assert np.all(seg_row[len(used):] == 0) and np.all(np.diff(used) >= 0)
    assert np.array_equal(np.unique(used), np.arange(1, used.max() + 1))
    for s in np.unique(used):
      assert np.array_equal(pos_row[seg_row == s], np.arange(np.sum(seg_row == s)))
  pad = batch["segment_ids"] == 0
  assert np.all(batch["weights"][pad] == 0) and np.all(batch["positions"][pad] == 0)


def _origins(batch, docs, seq_len):
  """Checks every real position against the documents; yields (doc, target position)."""
  for b in range(batch["inputs"].shape[0]):
    for s in np.unique(batch["segment_ids"][b]):
      if s == 0:
        continue
      at = batch["segment_ids"][b] == s
      inputs, targets = batch["inputs"][b][at], batch["targets"][b][at]
      doc, start = divmod(int(inputs[0]), BASE)
      assert start % seq_len == 0  # chunks start on seq_len boundaries of the document
      pos = start + np.arange(len(inputs))
      assert np.array_equal(inputs, doc * BASE + pos)
      assert np.array_equal(targets, doc * BASE + pos + 1)  # the next token, same document
      assert np.array_equal(batch["weights"][b][at], docs[doc]["weights"][pos + 1])
      # A chunk is complete: it ends at seq_len or at the document's end.
      assert len(inputs) == min(seq_len, len(docs[doc]["tokens"]) - 1 - start)
      yield from ((doc, int(p) + 1) for p in pos)


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("seq_len, batch_size", [(16, 4), (64, 3)])
def test_batches_match_the_documents(split, seq_len, batch_size):
  docs = _numbered_docs(300, max_len=5 * seq_len)
  per_epoch = sum(len(d["tokens"]) - 1 for d in docs)
  it = iter(build_dataset(docs, split=split, seq_len=seq_len, batch_size=batch_size, seed=3))
  seen = collections.Counter()
  steps = int(2.5 * per_epoch / (seq_len * batch_size)) + 1
  for step in range(steps):
    batch = next(it)
    _check_batch_structure(batch, batch_size, seq_len)
    seen.update(_origins(batch, docs, seq_len))
    if step == steps // 6:  # well inside the first epoch: nothing seen twice
      assert max(seen.values()) == 1
  expected = {(d, p) for d, doc in enumerate(docs) for p in range(1, len(doc["tokens"]))}
  assert set(seen) == expected and max(seen.values()) <= 3  # ~2.5 epochs, all targets


def test_packing_fills_rows():
  docs = _numbered_docs(200, max_len=40)
  batches = _take(iter(build_dataset(docs, split="train", seq_len=64, batch_size=8, seed=0)), 20)
  fill = np.mean([np.mean(b["segment_ids"] > 0) for b in batches])
  assert fill > 0.85


def test_train_order_depends_on_seed_and_reshuffles_each_epoch():
  # 9 tokens = 8 targets = one full row each, so row r holds the r-th document drawn.
  docs = [document(d * BASE + np.arange(9), np.ones(9)) for d in range(50)]

  def order(seed, n):
    it = iter(build_dataset(docs, split="train", seq_len=8, batch_size=1, seed=seed))
    return [int(b["inputs"][0, 0]) // BASE for b in _take(it, n)]

  first = order(0, 150)
  assert first == order(0, 150)
  assert first != order(1, 150)
  epochs = [first[i:i + 50] for i in (0, 50, 100)]
  assert all(sorted(e) == list(range(50)) for e in epochs)  # every document once per epoch
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(50))


def test_validation_order_is_fixed_and_ignores_seed():
  docs = _numbered_docs(50, max_len=40)
  a = _take(iter(build_dataset(docs, split="validation", seq_len=16, batch_size=2, seed=0)), 10)
  b = _take(iter(build_dataset(docs, split="validation", seq_len=16, batch_size=2, seed=9)), 10)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_documents(process_count):
  docs = _numbered_docs(100, max_len=30)
  owners = {}
  for p in range(process_count):
    it = iter(build_dataset(docs, split="train", seq_len=32, batch_size=2, seed=0,
                            process_index=p, process_count=process_count))
    for batch in _take(it, 60):  # more than one epoch of this shard
      for doc, _ in _origins(batch, docs, 32):
        assert owners.setdefault(doc, p) == p
  assert sorted(owners) == [d for d in range(100) if len(docs[d]["tokens"]) > 1]


SOURCES_UNDER_TEST = [dict(source="stdlib"), dict(source="passkey", task_length=200),
                      dict(source="mqar"), dict(source="copy", task_length=257)]


@pytest.mark.parametrize("overrides", SOURCES_UNDER_TEST, ids=lambda o: o["source"])
def test_real_sources_give_consistent_batches(data_cfg, overrides):
  cfg = data_cfg(**overrides)
  it = make_iterator(cfg, split="train", batch_size=4, seed=0)
  for batch in _take(it, 5):
    _check_batch_structure(batch, 4, cfg.seq_len)
    same = (batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]) & (
        batch["segment_ids"][:, 1:] > 0)
    assert np.array_equal(batch["targets"][:, :-1][same], batch["inputs"][:, 1:][same])
    assert batch["weights"].sum() > 0 and batch["inputs"].max() < 259


@pytest.mark.parametrize("overrides", SOURCES_UNDER_TEST[:2], ids=lambda o: o["source"])
def test_same_seed_same_batches_other_seed_other_batches(data_cfg, overrides):
  cfg = data_cfg(**overrides)

  def run(seed, split="train"):
    return _take(make_iterator(cfg, split=split, batch_size=4, seed=seed), 4)

  a, b, c = run(0), run(0), run(1)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
  assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
  v0, v1 = run(0, "validation"), run(1, "validation")
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(v0, v1) for k in x)


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("overrides", SOURCES_UNDER_TEST[:3], ids=lambda o: o["source"])
def test_restored_state_continues_exactly(data_cfg, overrides, split):
  cfg = data_cfg(**overrides)

  def make():
    return make_iterator(cfg, split=split, batch_size=3, seed=5)

  expected = _take(make(), 30)
  for k in (0, 1, 7, 23):
    original = make()
    _take(original, k)
    state = json.loads(json.dumps(original.get_state()))  # what grain.checkpoint writes
    resumed = make()
    resumed.set_state(state)
    for want, got, again in zip(expected[k:k + 6], _take(resumed, 6), _take(original, 6)):
      assert all(np.array_equal(want[f], got[f]) and np.array_equal(want[f], again[f])
                 for f in want)


@pytest.mark.parametrize("kwargs, message", [
    (dict(process_index=2, process_count=2), r"process_index=2"),
    (dict(batch_size=0), r"batch_size=0"),
    (dict(seed=-1), r"seed=-1"),
    (dict(split="test"), r"split='test'"),
])
def test_bad_arguments_are_named(kwargs, message):
  args = dict(split="train", seq_len=8, batch_size=2, seed=0) | kwargs
  with pytest.raises(ValueError, match=message):
    build_dataset(_numbered_docs(4, 8), **args)


def test_more_processes_than_documents_is_an_error():
  with pytest.raises(ValueError, match=r"2 documents, fewer than the 3 processes"):
    build_dataset(_numbered_docs(2, 8), split="train", seq_len=8, batch_size=2, seed=0,
                  process_index=0, process_count=3)
