"""``moejax data prepare`` + ``data.source="array_record"`` against independent references:
the in-memory ``files`` pipeline, ``transformers``' tokenizer, the raw ArrayRecord records."""

import json
import os
import signal
import threading
import multiprocessing
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from moejax.config import ConfigError, base_config
from moejax.validation import validate
from moejax.data import ShardedBatches, make_iterator
from moejax.data.array_record import MANIFEST
from moejax.data.prepare import PrepareError, prepare
from tests.oracle import require

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


def test_hf_tokenizer_of_a_converted_workdir_matches_transformers(tmp_path, corpus):
  tokenizers = require("tokenizers")
  transformers = require("transformers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  workdir = tmp_path / "converted"  # the layout `moejax convert --from-hf` leaves
  os.makedirs(workdir / "tokenizer")
  tok.save(str(workdir / "tokenizer" / "tokenizer.json"))
  texts = _write_corpus(tmp_path / "text", files=2, docs=40)
  prepare([str(tmp_path / "text" / "*.jsonl")], str(workdir), str(tmp_path / "out"), val_fraction=0.0,
          show_progress=False)
  oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=str(workdir / "tokenizer" / "tokenizer.json"))
  bos, eos = oracle.convert_tokens_to_ids("<s>"), oracle.convert_tokens_to_ids("</s>")
  want = [[bos] + oracle.encode(t, add_special_tokens=False) + [eos] for p in sorted(texts) for t in texts[p]]
  assert _records(tmp_path / "out", "train") == want
  assert any(len(w) < len(t.encode()) for w, t in zip(want, texts[sorted(texts)[0]]))  # real merges happened
  with open(tmp_path / "out" / MANIFEST) as f:
    manifest = json.load(f)
  assert manifest["tokenizer"]["vocab_size"] == oracle.vocab_size and manifest["dtype"] == "uint16"


def test_prepare_resumes_after_kill_9(tmp_path):
  _write_corpus(tmp_path / "text", files=4, docs=300)
  inputs, out, reference = str(tmp_path / "text" / "*.jsonl"), str(tmp_path / "out"), str(tmp_path / "reference")
  args = dict(val_fraction=0.1, shard_tokens=1000, show_progress=False)
  prepare([inputs], "byte", reference, **args)
  # A forked child (this process has everything imported) killed with SIGKILL mid-way.
  proc = multiprocessing.get_context("fork").Process(target=prepare, args=([inputs], "byte", out), kwargs=args)
  proc.start()
  parts = tmp_path / "out" / ".prepare" / "parts"
  deadline = time.time() + 120
  while time.time() < deadline and not (parts.is_dir() and len(os.listdir(parts)) >= 3):
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.join()
  assert proc.exitcode == -signal.SIGKILL
  assert not (tmp_path / "out" / MANIFEST).exists()
  finished = sorted(f for f in os.listdir(parts) if f.endswith(".json"))
  assert finished, "prepare finished no part before the kill"
  kept = {f: os.stat(tmp_path / "out" / "train" / (f[:-5] + ".array_record")).st_ino for f in finished
          if (tmp_path / "out" / "train" / (f[:-5] + ".array_record")).exists()}
  prepare([inputs], "byte", out, **args)
  for split in ("train", "validation"):
    assert _records(out, split) == _records(reference, split)
  with open(os.path.join(out, MANIFEST)) as f, open(os.path.join(reference, MANIFEST)) as g:
    assert json.load(f)["splits"] == json.load(g)["splits"]
  for f, inode in kept.items():  # finished parts were kept, not rewritten
    assert os.stat(tmp_path / "out" / "train" / (f[:-5] + ".array_record")).st_ino == inode
  assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]


ALPHABETS = {"web": "abcdefghij", "code": "klmnopqrst", "math": "0123456789"}  # disjoint byte ranges


@pytest.fixture(scope="module")
def mixture_root(tmp_path_factory):
  """data/{web,code,math}: prepared sources whose documents use disjoint characters."""
  root = tmp_path_factory.mktemp("mixture")
  rng = np.random.default_rng(0)
  for name, alphabet in ALPHABETS.items():
    os.makedirs(root / "text" / name)
    with open(root / "text" / name / "docs.jsonl", "w") as f:
      for _ in range(150):
        f.write(json.dumps({"text": "".join(rng.choice(list(alphabet), rng.integers(20, 60)))}) + "\n")
    prepare([str(root / "text" / name / "docs.jsonl")], "byte", str(root / "data" / name), val_fraction=0.1,
            show_progress=False)
  return root / "data"


def _source_of_segments(batch):
  """Independent per-source token counts: each packed chunk's source read off its characters."""
  counts = dict.fromkeys(ALPHABETS, 0)
  for row_ids, row_inputs in zip(batch["segment_ids"], batch["inputs"]):
    for segment in set(row_ids[row_ids > 0].tolist()):
      tokens = row_inputs[row_ids == segment]
      text = bytes((tokens[tokens >= 3] - 3).astype(np.uint8).tolist()).decode()
      (name,) = {n for n, a in ALPHABETS.items() if set(text) <= set(a)}
      counts[name] += len(tokens)
  return counts


def _mixture_batches(mixture_root, **data):
  cfg = _cfg(source="array_record", path=str(mixture_root), mixture="web=0.6,code=0.3,math=0.1", seq_len=32,
             **data)
  validate(cfg)
  return ShardedBatches(cfg.data, split="train", global_batch=8, seed=0, num_shards=2)


def test_mixture_follows_weights_and_counts_tokens_per_source(mixture_root):
  batches = _mixture_batches(mixture_root)
  want = dict.fromkeys(ALPHABETS, 0)
  for batch in _take(batches, 150):
    assert "sources" not in batch
    for name, n in _source_of_segments(batch).items():
      want[name] += n
  assert batches.source_tokens() == {f"data_tokens_{n}": want[n] for n in ALPHABETS}
  total = sum(want.values())
  for name, weight in (("web", 0.6), ("code", 0.3), ("math", 0.1)):
    assert abs(want[name] / total - weight) < 0.05, want
  again = _mixture_batches(mixture_root)
  assert _same(_take(again, 20), _take(_mixture_batches(mixture_root), 20))  # deterministic given the seed


def test_resume_mid_mixture_is_exact(mixture_root):
  expected = _mixture_batches(mixture_root)
  want = _take(expected, 40)
  for k in (3, 17):
    original = _mixture_batches(mixture_root)
    _take(original, k)
    states = json.loads(json.dumps(original.shard_states()))  # what the checkpoint writes
    resumed = _mixture_batches(mixture_root)
    resumed.set_shard_states(states)
    assert resumed.source_tokens() == original.source_tokens()
    assert _same(_take(resumed, 40 - k), want[k:])
    assert resumed.source_tokens() == expected.source_tokens()


def _one_document_per_row_corpus(tmp_path, seq_len, docs):
  """Documents of exactly seq_len + 1 tokens (bos + text + eos): each fills one packed row."""
  os.makedirs(tmp_path / "text")
  texts = [f"{i:06d}".ljust(seq_len - 1, "x") for i in range(docs)]
  with open(tmp_path / "text" / "d.jsonl", "w") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
  prepare([str(tmp_path / "text" / "d.jsonl")], "byte", str(tmp_path / "out"), val_fraction=0.0,
          shard_tokens=500, show_progress=False)
  return texts


def test_two_processes_read_disjoint_shards_covering_each_epoch_once(tmp_path):
  seq_len, docs = 16, 90
  texts = _one_document_per_row_corpus(tmp_path, seq_len, docs)
  cfg = _cfg(source="array_record", path=str(tmp_path / "out"), seq_len=seq_len).data
  epochs = []
  for process in range(2):
    batches = ShardedBatches(cfg, split="train", global_batch=4, seed=1, num_shards=2, process_index=process,
                             process_count=2)
    rows = [bytes((row[1:] - 3).astype(np.uint8).tolist()).decode()
            for batch in _take(batches, docs // 2) for row in batch["inputs"]]
    assert all(np.all(b["segment_ids"] == 1) for b in _take(batches, 2))
    epochs.append((rows[:docs // 2], rows[docs // 2:]))  # this process's 45 documents, twice
  for first, second in epochs:
    assert len(set(first)) == docs // 2 and set(first) == set(second) and first != second
  assert not set(epochs[0][0]) & set(epochs[1][0])
  assert sorted(epochs[0][0] + epochs[1][0]) == sorted(texts)


def test_reading_keeps_rss_flat_on_a_corpus_far_larger_than_the_buffers(tmp_path):
  def rss_mib():
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

  rng = np.random.default_rng(0)
  alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz    ", np.uint8)
  os.makedirs(tmp_path / "text")
  with open(tmp_path / "text" / "big.jsonl", "w") as f:
    for _ in range(12000):
      f.write(json.dumps({"text": rng.choice(alphabet, 2000).tobytes().decode()}) + "\n")
  peak, done = [rss_mib()], threading.Event()

  def sample():
    while not done.wait(0.005):
      peak.append(rss_mib())

  sampler = threading.Thread(target=sample)
  sampler.start()
  manifest = prepare([str(tmp_path / "text" / "big.jsonl")], "byte", str(tmp_path / "out"), val_fraction=0.0,
                     shard_tokens=1 << 22, show_progress=False)
  done.set()
  sampler.join()
  corpus_mib = manifest["splits"]["train"]["tokens"] * 4 / 2**20  # as int32 in memory
  assert corpus_mib > 90  # ~30x the pipeline's buffers (a 2**18-token chunk window, a few batches)
  assert max(peak) - peak[0] < corpus_mib / 4, (peak[0], max(peak))  # prepare streams too
  cfg = _cfg(source="array_record", path=str(tmp_path / "out"), seq_len=256).data
  before = rss_mib()
  it = make_iterator(cfg, split="train", batch_size=8, seed=0)
  _take(it, 600)  # steady state: every shard's reader open (~1 MB each with its index), malloc warmed up
  built = rss_mib()
  _take(it, 600)  # ~1.2M more tokens from ~600 more documents scattered over the corpus
  assert built - before < corpus_mib / 2, (before, built)  # ~35 MB steady overhead here, whatever the corpus
  assert rss_mib() - built < 4, (built, rss_mib())


def test_training_logs_and_resumes_per_source_tokens(mixture_root, tmp_path, devices):
  from moejax.train import train
  cfg = _cfg(source="array_record", path=str(mixture_root), mixture="web=0.6,code=0.3,math=0.1", seq_len=32)
  cfg.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1, ffn_dim=64)
  cfg.train.update(steps=1, batch_size=8, log_every=1, checkpoint_every=1, async_checkpoint=False)
  validate(cfg)
  train(cfg, str(tmp_path / "run"), devices[:1])
  cfg.train.steps = 3
  train(cfg, str(tmp_path / "run"), devices[:1])  # resumes from the checkpoint of step 1
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = {r["step"]: {k: v for k, v in r.items() if k.startswith("data_tokens_")} for r in map(json.loads, f)}
  reference = ShardedBatches(cfg.data, split="train", global_batch=8, seed=cfg.seed, num_shards=1)
  for step in range(1, 4):
    next(reference)
    assert logged[step] == reference.source_tokens()


def _prepared(tmp_path, **kwargs):
  _write_corpus(tmp_path / "text", files=2, docs=40)
  out = str(tmp_path / "out")
  prepare([str(tmp_path / "text" / "*.jsonl")], "byte", out, show_progress=False, **kwargs)
  return out


def _shard(out, split="train", index=0):
  with open(os.path.join(out, MANIFEST)) as f:
    return os.path.join(out, json.load(f)["splits"][split]["shards"][index]["file"])


def _expect_config_error(cfg, *fragments):
  with pytest.raises(ConfigError) as err:
    validate(cfg)
  for fragment in fragments:
    assert fragment in str(err.value), str(err.value)


def test_missing_truncated_or_garbled_shards_are_named(tmp_path):
  out = _prepared(tmp_path, val_fraction=0.2, shard_tokens=600)
  cfg = _cfg(source="array_record", path=out, seq_len=32)
  validate(cfg)
  missing, truncated, garbled = _shard(out, index=0), _shard(out, index=1), _shard(out, index=2)
  os.remove(missing)
  with open(truncated, "r+b") as f:
    f.truncate(os.path.getsize(truncated) // 2)
  with open(garbled, "r+b") as f:
    f.write(b"\0" * os.path.getsize(garbled))
  _expect_config_error(cfg, f"{missing} listed in", "is missing", f"{truncated} has", "truncated",
                       f"{garbled} is not a readable ArrayRecord", "moejax data prepare")


def test_manifest_of_another_tokenizer_or_vocabulary_is_refused(tmp_path, sentencepiece_model):
  out = _prepared(tmp_path, val_fraction=0.2)
  cfg = _cfg(source="array_record", path=out, tokenizer=sentencepiece_model[0], seq_len=32)
  _expect_config_error(cfg, f"{out}/{MANIFEST} was tokenized with 'byte'", "data.tokenizer=")
  cfg = _cfg(source="array_record", path=out, seq_len=32)
  cfg.model.vocab_size = 100
  _expect_config_error(cfg, "holds token id", "model.vocab_size=100")


def test_empty_split_unfinished_prepare_and_missing_path_are_named(tmp_path):
  out = _prepared(tmp_path, val_fraction=0.0)
  cfg = _cfg(source="array_record", path=out, seq_len=32)
  validate(cfg)
  cfg.train.eval_every = 10
  _expect_config_error(cfg, f"the validation split of {out} has 0 tokens", "--config.train.eval_every=0")
  os.remove(os.path.join(out, MANIFEST))
  _expect_config_error(cfg, f"{out}/{MANIFEST} does not exist", "rerun the same command")
  _expect_config_error(_cfg(source="array_record"), "data.path=DIR")
  _expect_config_error(_cfg(source="stdlib", mixture="a=1:/x"), "data.source=array_record")
  _expect_config_error(_cfg(workers=-1), "data.workers=-1")


@pytest.mark.parametrize("mixture, fragments", [
    ("web=0.7,code=0", ["'code=0'", "must be > 0"]),
    ("web=-1,code=1", ["'web=-1'", "must be > 0"]),
    ("web=0.5,video=0.5", ["source 'video': unknown source", "['code', 'math', 'web']"]),
    ("web=half", ["weight 'half' is not a number"]),
    ("web", ["'web' is not NAME=WEIGHT"]),
    ("web=1,web=2", ["names 'web' twice"]),
])
def test_bad_mixtures_are_named(mixture_root, mixture, fragments):
  _expect_config_error(_cfg(source="array_record", path=str(mixture_root), mixture=mixture), "data.mixture",
                       *fragments)


def test_cli_refuses_bad_data_before_writing_anything(tmp_path, capsys):
  from moejax.cli import main
  workdir = tmp_path / "run"
  code = main(["train", "--config", "configs/tiny.py", "--workdir", str(workdir), "--config.data.source=array_record",
               f"--config.data.path={tmp_path / 'nowhere'}"])
  assert code == 2 and not workdir.exists()
  assert f"{tmp_path / 'nowhere'}/{MANIFEST} does not exist" in capsys.readouterr().err
  code = main(["data", "prepare", "--input", str(tmp_path / "none*.jsonl"), "--tokenizer", "byte", "--out",
               str(tmp_path / "out")])
  assert code == 2 and not (tmp_path / "out").exists()
  assert "matched no file" in capsys.readouterr().err


def test_prepare_refuses_other_arguments_in_the_same_out(tmp_path):
  out = _prepared(tmp_path, val_fraction=0.1)
  with pytest.raises(PrepareError, match="other arguments or input files"):
    prepare([str(tmp_path / "text" / "*.jsonl")], "byte", out, val_fraction=0.2, show_progress=False)
  os.makedirs(tmp_path / "other")
  (tmp_path / "other" / "keep.txt").write_text("mine")
  with pytest.raises(PrepareError, match="not a preparation directory"):
    prepare([str(tmp_path / "text" / "*.jsonl")], "byte", str(tmp_path / "other"), show_progress=False)


def test_grain_workers_resume_exactly(mixture_root):
  original = _mixture_batches(mixture_root, workers=2)
  resumed = _mixture_batches(mixture_root, workers=2)
  try:
    _take(original, 5)
    states = json.loads(json.dumps(original.shard_states()))
    resumed.set_shard_states(states)
    want, got = _take(original, 8), _take(resumed, 8)
    assert _same(got, want) and resumed.source_tokens() == original.source_tokens()
    counts = dict.fromkeys(ALPHABETS, 0)
    for batch in want:
      for name, n in _source_of_segments(batch).items():
        counts[name] += n
    before = sum(sum(v["tokens"]) for k, v in states.items() if k.startswith("source_tokens_"))
    assert sum(counts.values()) == sum(original.source_tokens().values()) - before
  finally:
    original.close()
    resumed.close()



def test_parquet_and_txt_inputs_give_the_same_records_as_jsonl(tmp_path):
  pq = require("pyarrow.parquet")
  pa = require("pyarrow")
  texts = ["first document", "second one\nwith two lines", "  ", "third λ"]
  os.makedirs(tmp_path / "p")
  pq.write_table(pa.table({"body": texts, "n": list(range(4))}), tmp_path / "p" / "a.parquet", row_group_size=2)
  os.makedirs(tmp_path / "t")
  for i, t in enumerate(texts):
    (tmp_path / "t" / f"{i}.txt").write_text(t, encoding="utf-8")
  prepare([str(tmp_path / "p" / "a.parquet")], "byte", str(tmp_path / "po"), field="body", val_fraction=0.0,
          show_progress=False)
  prepare([str(tmp_path / "t" / "*.txt")], "byte", str(tmp_path / "to"), val_fraction=0.0, show_progress=False)
  want = [[1] + [b + 3 for b in t.encode()] + [2] for t in texts if t.strip()]
  assert _records(tmp_path / "po", "train") == want and _records(tmp_path / "to", "train") == want
  with pytest.raises(PrepareError, match="has no column 'text'"):
    prepare([str(tmp_path / "p" / "a.parquet")], "byte", str(tmp_path / "bad"), show_progress=False)
  (tmp_path / "t" / "x.jsonl").write_text('{"body": "a"}\n')
  with pytest.raises(PrepareError, match="line 1 has no string field 'text'"):
    prepare([str(tmp_path / "t" / "x.jsonl")], "byte", str(tmp_path / "bad"), show_progress=False)
  assert not (tmp_path / "bad").exists()  # refused before writing anything
