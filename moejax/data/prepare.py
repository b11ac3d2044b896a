"""``moejax data prepare``: text files -> ArrayRecord shards of token ids + a manifest.

    moejax data prepare --input 'corpus/**/*.jsonl' --tokenizer byte --out data/web [--workers 4]

Each input file is read as a stream (``.jsonl``: one document per line's ``--field``;
``.txt``: one document per file; ``.parquet``: one per row of ``--field``, needs
``pyarrow``) and each document is written as one record ``bos + encode(text) + eos``
(uint16 when the vocabulary fits, else uint32). A document goes to the validation split
iff ``blake2b(text) < --val-fraction`` (the same rule as ``validation_mask``): the split
depends on the text alone, so adding, renaming or reordering files moves no document,
and duplicate documents always land in the same split.

Layout of ``--out``::

    manifest.json                       written last: splits, shards, token counts,
                                        tokenizer identity, source files + sha256
    train/FFFFF-PPPPP.array_record      part P of input file F (sorted paths)
    validation/FFFFF-PPPPP.array_record
    .prepare/plan.json                  the arguments; a rerun must match them
    .prepare/parts/FFFFF-PPPPP.json     a finished part (documents it covers, shard stats)
    .prepare/files/FFFFF.json           a finished file (sha256, documents)

A part closes after ``--shard-tokens`` tokens: its shard files are written under a
temporary name and renamed, then its part record is renamed into place, so a crash
(even ``kill -9``) loses at most the parts in flight; rerunning the same command keeps
the finished parts and redoes the rest. Memory is one document and one open shard per
worker, whatever the corpus size.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import queue
from collections.abc import Iterator, Sequence

import numpy as np

from moejax.config import ConfigError
from moejax.data.array_record import FORMAT, MANIFEST, SHARD_SUFFIX, tokenizer_identity
from moejax.data.source import SPLITS
from moejax.data.text import _hash_fraction

FORMATS = ("jsonl", "txt", "parquet")
DEFAULT_SHARD_TOKENS = 1 << 24  # ~32 MiB of uint16 per part


class PrepareError(ConfigError):
  """Bad arguments or input for ``prepare`` (the CLI exits 2); nothing was written when raised
  before the first shard."""


def _atomic_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _expand(inputs: Sequence[str]) -> list[str]:
  paths = set()
  for pattern in inputs:
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
    if not matched:
      raise PrepareError(f"--input {pattern!r} matched no file (working directory {os.getcwd()!r}); fix the glob.")
    paths.update(os.path.abspath(p) for p in matched)
  return sorted(paths)


def _format_of(path: str, fmt: str | None) -> str:
  found = fmt or os.path.splitext(path)[1].lstrip(".")
  if found not in FORMATS:
    raise PrepareError(f"{path}: cannot tell its format from the suffix; pass --format one of {FORMATS}.")
  return found


def read_documents(path: str, fmt: str, field: str, hasher) -> Iterator[str]:
  """The non-blank document texts of one file, streamed; ``hasher`` sees every byte of the file."""
  if fmt == "parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError as err:
      raise PrepareError(f"{path}: reading parquet needs pyarrow: `pip install pyarrow`.") from err
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
      raise PrepareError(f"{path} has no column {field!r} (columns: {table.schema_arrow.names}); set --field.")
    for batch in table.iter_batches(columns=[field], batch_size=1024):
      yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())
    with open(path, "rb") as f:  # after the rows: a caller that stops early reads no more
      for block in iter(lambda: f.read(1 << 20), b""):
        hasher.update(block)
    return
  with open(path, "rb") as f:
    if fmt == "txt":
      data = f.read()
      hasher.update(data)
      text = _decode(path, data, 0)
      if text.strip():
        yield text
      return
    for number, line in enumerate(f, start=1):
      hasher.update(line)
      if not line.strip():
        continue
      try:
        record = json.loads(_decode(path, line, number))
      except json.JSONDecodeError as err:
        raise PrepareError(f"{path} line {number} is not valid JSON ({err}); fix or remove that line.") from err
      if not isinstance(record, dict) or not isinstance(record.get(field), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise PrepareError(f"{path} line {number} has no string field {field!r} (found: {keys}); set --field.")
      if record[field].strip():
        yield record[field]


def _decode(path: str, data: bytes, line: int) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as err:
    where = f"line {line}, " if line else ""
    raise PrepareError(f"{path} is not UTF-8 ({where}byte offset {err.start}); convert it (`iconv -t UTF-8`) "
                       "or leave it out of --input.") from err


def _check_first_document(path: str, fmt: str, field: str) -> None:
  """Reads a file's first document, so a wrong --field or format fails before anything is written."""
  class _NoHash:
    def update(self, data):
      del data

  if fmt != "txt":  # a .txt file is one document: reading it here would read it twice
    next(read_documents(path, fmt, field, _NoHash()), None)


_TOKENIZER = {}


def _tokenizer(spec: str):
  if spec not in _TOKENIZER:
    from moejax.data.tokenizers import get_tokenizer
    _TOKENIZER[spec] = get_tokenizer(spec)
  return _TOKENIZER[spec]


class _Part:
  """The open shard files (one per split) of one part of one input file."""

  def __init__(self, out: str, file_index: int, part: int, first_document: int):
    from array_record.python.array_record_module import ArrayRecordWriter
    self.name = f"{file_index:05d}-{part:05d}"
    self.first_document, self.documents, self.tokens = first_document, 0, 0
    self.stats = {s: {"file": f"{s}/{self.name}{SHARD_SUFFIX}", "records": 0, "tokens": 0, "max_id": -1}
                  for s in SPLITS}
    self._out = out
    self._writers = {s: ArrayRecordWriter(self._path(s) + ".tmp", "group_size:1") for s in SPLITS}

  def _path(self, split: str) -> str:
    return os.path.join(self._out, self.stats[split]["file"])

  def add(self, split: str, tokens: np.ndarray) -> None:
    self._writers[split].write(tokens.astype("<" + tokens.dtype.str[1:]).tobytes())
    stats = self.stats[split]
    stats["records"] += 1
    stats["tokens"] += len(tokens)
    stats["max_id"] = max(stats["max_id"], int(tokens.max()))
    self.documents += 1
    self.tokens += len(tokens)

  def finish(self) -> dict:
    """Closes, renames the shards into place, then records the part (the commit point)."""
    for split, writer in self._writers.items():
      writer.close()
      if self.stats[split]["records"]:
        os.replace(self._path(split) + ".tmp", self._path(split))
        self.stats[split]["bytes"] = os.path.getsize(self._path(split))
      else:
        os.remove(self._path(split) + ".tmp")
    record = {"first_document": self.first_document, "documents": self.documents, "splits": self.stats}
    _atomic_json(os.path.join(self._out, ".prepare", "parts", self.name + ".json"), record)
    return record


def _finished_parts(out: str, file_index: int) -> list[dict]:
  """The part records of file ``file_index``, in order; removes its unfinished shard files."""
  parts_dir = os.path.join(out, ".prepare", "parts")
  parts = []
  while os.path.isfile(path := os.path.join(parts_dir, f"{file_index:05d}-{len(parts):05d}.json")):
    with open(path) as f:
      parts.append(json.load(f))
  kept = {s["file"] for p in parts for s in p["splits"].values()}
  for split in SPLITS:
    for path in glob.glob(os.path.join(out, split, f"{file_index:05d}-*")):
      if f"{split}/{os.path.basename(path)}" not in kept:
        os.remove(path)  # a shard (or .tmp) of a part that did not finish
  return parts


def prepare_file(job: dict, progress=None) -> dict:
  """Tokenizes input file ``job["index"]`` into parts (resuming after its finished parts)."""
  out, index, path = job["out"], job["index"], job["path"]
  done_path = os.path.join(out, ".prepare", "files", f"{index:05d}.json")
  if os.path.isfile(done_path):
    with open(done_path) as f:
      return json.load(f)
  tokenizer = _tokenizer(job["tokenizer"])
  dtype = np.dtype(job["dtype"])
  parts = _finished_parts(out, index)
  skip = sum(p["documents"] for p in parts)
  hasher, part, count = hashlib.sha256(), None, 0
  for count, text in enumerate(read_documents(path, job["format"], job["field"], hasher), start=1):
    if count <= skip:
      continue
    if part is None:
      part = _Part(out, index, len(parts), count - 1)
    ids = tokenizer.encode(text)
    tokens = np.empty(len(ids) + 2, dtype)
    tokens[0], tokens[1:-1], tokens[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
    part.add("validation" if _hash_fraction(text) < job["val_fraction"] else "train", tokens)
    if part.tokens >= job["shard_tokens"]:
      parts.append(part.finish())
      part = None
      if progress:
        progress(index, False)
  if part is not None:
    parts.append(part.finish())
  record = {"path": path, "sha256": hasher.hexdigest(), "bytes": os.path.getsize(path), "documents": count,
            "parts": parts}
  _atomic_json(done_path, record)
  if progress:
    progress(index, True)
  return record


_QUEUE = None


def _init_worker(q) -> None:
  global _QUEUE
  _QUEUE = q


def _worker(job: dict) -> dict:
  return prepare_file(job, lambda index, done: _QUEUE.put((index, done)))


def _plan(inputs: Sequence[str], tokenizer: str, fmt: str | None, field: str, val_fraction: float,
          shard_tokens: int) -> dict:
  """The arguments, input files and tokenizer identity; raises PrepareError before anything is written."""
  if not 0.0 <= val_fraction < 1.0:
    raise PrepareError(f"--val-fraction={val_fraction} must be in [0, 1).")
  if shard_tokens < 1:
    raise PrepareError(f"--shard-tokens={shard_tokens} must be >= 1.")
  paths = _expand(inputs)
  formats = [_format_of(p, fmt) for p in paths]
  for path, found in zip(paths, formats):
    _check_first_document(path, found, field)
  try:
    tok = _tokenizer(tokenizer)
    identity = tokenizer_identity(tokenizer, tok)
  except (OSError, ValueError, ImportError) as err:
    raise PrepareError(f"--tokenizer {tokenizer!r}: {err}") from err
  plan = {"format": FORMAT, "inputs": [{"path": p, "format": f, "bytes": os.path.getsize(p),
                                         "mtime_ns": os.stat(p).st_mtime_ns} for p, f in zip(paths, formats)],
          "tokenizer": identity, "dtype": "uint16" if tok.vocab_size <= 1 << 16 else "uint32",
          "field": field, "val_fraction": val_fraction, "shard_tokens": shard_tokens}
  return plan


def prepare(inputs: Sequence[str], tokenizer: str, out: str, *, fmt: str | None = None, field: str = "text",
            val_fraction: float = 0.05, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int = 0,
            show_progress: bool = True) -> dict:
  """Writes (or finishes) the prepared directory ``out``; returns its manifest. See the module docstring."""
  from tqdm import tqdm
  plan = _plan(inputs, tokenizer, fmt, field, val_fraction, shard_tokens)
  plan_path = os.path.join(out, ".prepare", "plan.json")
  if os.path.isfile(plan_path):
    with open(plan_path) as f:
      previous = json.load(f)
    if previous != plan:
      raise PrepareError(f"{out} holds a preparation with other arguments or input files ({plan_path}); rerun "
                         "the original command to finish it, or pass a new --out.")
  elif os.path.exists(out) and os.listdir(out):
    raise PrepareError(f"--out {out} exists and is not a preparation directory; pass an empty or new --out.")
  for sub in ("parts", "files"):
    os.makedirs(os.path.join(out, ".prepare", sub), exist_ok=True)
  for split in SPLITS:
    os.makedirs(os.path.join(out, split), exist_ok=True)
  if not os.path.isfile(plan_path):
    _atomic_json(plan_path, plan)
  jobs = [{"out": out, "index": i, "path": e["path"], "format": e["format"], "field": field, "tokenizer": tokenizer,
           "dtype": plan["dtype"], "val_fraction": val_fraction, "shard_tokens": shard_tokens}
          for i, e in enumerate(plan["inputs"])]
  with tqdm(total=len(jobs), unit="file", desc=f"prepare {out}", disable=not show_progress) as bar:
    if workers <= 0:
      records = []
      for job in jobs:
        records.append(prepare_file(job))
        bar.update(1)
    else:
      records = _run_pool(jobs, workers, bar)
  manifest = _manifest(plan, records)
  _atomic_json(os.path.join(out, MANIFEST), manifest)
  return manifest


def _run_pool(jobs: list[dict], workers: int, bar) -> list[dict]:
  ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold tokenizer threads
  q = ctx.Queue()
  with ctx.Pool(workers, initializer=_init_worker, initargs=(q,)) as pool:
    results = [pool.apply_async(_worker, (job,)) for job in jobs]
    parts = 0
    while not all(r.ready() for r in results):
      try:
        _, file_done = q.get(timeout=0.2)
      except queue.Empty:
        continue
      parts += not file_done
      bar.update(int(file_done))
      bar.set_postfix(parts=parts)
    return [r.get() for r in results]  # re-raises a worker's error


def _manifest(plan: dict, records: list[dict]) -> dict:
  splits = {s: {"documents": 0, "tokens": 0, "max_id": -1, "shards": []} for s in SPLITS}
  for record in records:
    for part in record["parts"]:
      for split, stats in part["splits"].items():
        if stats["records"]:
          splits[split]["shards"].append(stats)
          splits[split]["documents"] += stats["records"]
          splits[split]["tokens"] += stats["tokens"]
          splits[split]["max_id"] = max(splits[split]["max_id"], stats["max_id"])
  return {"format": FORMAT, "tokenizer": plan["tokenizer"], "dtype": plan["dtype"], "field": plan["field"],
          "val_fraction": plan["val_fraction"],
          "split_rule": "validation iff blake2b-64(document text) / 2**64 < val_fraction",
          "sources": [{k: r[k] for k in ("path", "sha256", "bytes", "documents")} for r in records],
          "splits": splits}



def main(argv: Sequence[str]) -> int:
  """``moejax data prepare ...`` (see the module docstring)."""
  import argparse
  parser = argparse.ArgumentParser(prog="moejax data prepare",
                                   description="Tokenize text files once into ArrayRecord shards + manifest.json.")
  parser.add_argument("--input", required=True, action="append",
                      help="glob(s) of input files (repeat or comma-separate), e.g. 'corpus/**/*.jsonl'")
  parser.add_argument("--tokenizer", required=True,
                      help="byte | a SentencePiece .model | a tokenizers .json | a directory holding one "
                           "(e.g. a workdir written by `moejax convert --from-hf`)")
  parser.add_argument("--out", required=True, help="the directory to write (rerun the same command to resume)")
  parser.add_argument("--format", default=None, choices=FORMATS, help="input format (default: from each suffix)")
  parser.add_argument("--field", default="text", help="the text field of JSONL records / parquet rows")
  parser.add_argument("--workers", type=int, default=0, help="worker processes, one file at a time each (0: inline)")
  parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out, by text hash")
  parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard part")
  try:
    args = parser.parse_args(list(argv))
  except SystemExit as exit_:
    return int(exit_.code or 0)
  inputs = [p.strip() for arg in args.input for p in arg.split(",") if p.strip()]
  manifest = prepare(inputs, args.tokenizer, args.out, fmt=args.format, field=args.field,
                     val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers)
  for split, info in manifest["splits"].items():
    print(f"{split}: {info['documents']} documents, {info['tokens']} tokens in {len(info['shards'])} shards")
  print(f"wrote {os.path.join(args.out, MANIFEST)}; train with: moejax train --config configs/tiny.py "
        f"--config.data.source=array_record --config.data.path={args.out} "
        f"--config.data.tokenizer={manifest['tokenizer']['spec']}")
  return 0
