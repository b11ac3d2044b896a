"""``data.source="array_record"``: pre-tokenized shards written by ``moejax data prepare``.

A prepared directory holds ``manifest.json`` and ``{train,validation}/*.array_record``
shards; each record is one document's token ids (``bos + ids + eos``, little-endian
``manifest["dtype"]``), so a document boundary is a record boundary. Documents are read
on access through grain's ``ArrayRecordDataSource`` (random access, nothing loaded at
start-up), in shard-name order, and then go through the same shuffle / chunk / pack
pipeline as every other source (``moejax/data/pipeline.py``).

One directory: ``--config.data.path=DIR``. A mixture of named directories with weights
(``data.mixture``, one grammar, comma-separated ``NAME=WEIGHT[:DIR]``)::

    --config.data.mixture='web=0.7:/data/web,code=0.2:/data/code,math=0.1:/data/math'
    --config.data.path=/data --config.data.mixture='web=0.7,code=0.2,math=0.1'

An entry without ``:DIR`` names the subdirectory ``data.path/NAME``. Weights are
relative (normalised to sum to 1) and are shares of the chunks (<= ``data.seq_len``
tokens each) drawn from each source.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from moejax.data.source import SOURCES, Document, Mixture, check_split, document

MANIFEST = "manifest.json"
FORMAT = "moejax-array-record-v1"
SHARD_SUFFIX = ".array_record"


def file_sha256(path: str) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def tokenizer_identity(spec: str, tokenizer) -> dict[str, Any]:
  """What a manifest records about the tokenizer: its file's hash (or "byte") and special ids."""
  from moejax.data.tokenizers import resolve_tokenizer_path
  path = resolve_tokenizer_path(spec)
  return {"spec": spec, "sha256": "byte" if path == "byte" else file_sha256(path),
          "vocab_size": int(tokenizer.vocab_size), "bos_id": int(tokenizer.bos_id),
          "eos_id": int(tokenizer.eos_id), "pad_id": int(tokenizer.pad_id)}


class ShardDocuments(Sequence[Document]):
  """The documents of one split of a prepared directory, read from its shards on access.

  ``self[i]`` is ``{"tokens": int32[n], "weights": float32[n]}`` with weight 0 on the
  bos (nothing predicts it), as in the text sources. Picklable (grain workers reopen it).
  """

  def __init__(self, paths: Sequence[str], dtype: str):
    import grain
    self.paths, self.dtype = list(paths), np.dtype(dtype)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Document:
    tokens = np.frombuffer(self._source[index], self.dtype.newbyteorder("<")).astype(np.int32)
    weights = np.ones(len(tokens), np.float32)
    weights[0] = 0.0
    return document(tokens, weights)


def load_manifest(directory: str) -> dict[str, Any]:
  """The parsed ``DIR/manifest.json``; ValueError naming the file and the fix otherwise."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    hint = (" (an unfinished `moejax data prepare` left it without one: rerun the same command to finish)"
            if os.path.isdir(os.path.join(directory, ".prepare")) else "")
    raise ValueError(f"{path} does not exist{hint}; point data.path/data.mixture at a directory written "
                     "by `moejax data prepare --out DIR`.")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"{path} is not readable JSON ({err}); rerun `moejax data prepare` into a new --out.") from err
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} manifest; rerun `moejax data prepare` into a new --out.")
  return manifest


def parse_mixture(data_cfg) -> list[tuple[str, float, str]]:
  """[(name, weight, directory)] of ``data.mixture`` (see the module docstring); ValueError if malformed."""
  entries = []
  for part in (p.strip() for p in data_cfg.mixture.split(",")):
    if not part:
      continue
    name, sep, rest = part.partition("=")
    weight, _, directory = rest.partition(":")
    name, directory = name.strip(), directory.strip()
    if not sep or not name:
      raise ValueError(f"data.mixture entry {part!r} is not NAME=WEIGHT[:DIR], e.g. 'web=0.7:/data/web'.")
    try:
      value = float(weight)
    except ValueError:
      raise ValueError(f"data.mixture entry {part!r}: weight {weight!r} is not a number.") from None
    if not value > 0 or not np.isfinite(value):
      raise ValueError(f"data.mixture entry {part!r}: weight {value} must be > 0; drop the source "
                       "instead of giving it weight 0.")
    if any(name == n for n, _, _ in entries):
      raise ValueError(f"data.mixture names {name!r} twice; give each source one entry.")
    if not directory:
      if not data_cfg.path:
        raise ValueError(f"data.mixture entry {part!r} has no :DIR and data.path is unset; write "
                         f"'{name}={weight}:/path/to/{name}' or set data.path to the parent directory.")
      directory = os.path.join(data_cfg.path, name)
    entries.append((name, value, directory))
  if not entries:
    raise ValueError(f"data.mixture={data_cfg.mixture!r} names no source; e.g. "
                     "'web=0.7:/data/web,code=0.3:/data/code'.")
  return entries


def directories(data_cfg) -> dict[str, tuple[float, str]]:
  """{name: (weight, directory)}: the mixture's entries, or {"": (1.0, data.path)}."""
  if data_cfg.mixture:
    return {name: (weight, directory) for name, weight, directory in parse_mixture(data_cfg)}
  return {"": (1.0, data_cfg.path)}


def mixture_names(data_cfg) -> list[str]:
  """The source names of ``data.mixture`` (empty when the run reads one source)."""
  if data_cfg.source != "array_record" or not data_cfg.mixture:
    return []
  return [name for name, _, _ in parse_mixture(data_cfg)]


def split_documents(directory: str, split: str) -> ShardDocuments:
  check_split(split)
  manifest = load_manifest(directory)
  shards = manifest["splits"][split]["shards"]
  if not shards:
    raise ValueError(f"the {split} split of {directory} is empty; rerun `moejax data prepare` with "
                     "--val-fraction > 0 (validation) or more input, or set --config.train.eval_every=0.")
  return ShardDocuments([os.path.join(directory, s["file"]) for s in shards], manifest["dtype"])


def array_record_source(data_cfg, split: str, tokenizer) -> Sequence[Document] | Mixture:
  """The shards of ``data.path``, or a :class:`Mixture` of ``data.mixture``'s directories."""
  del tokenizer  # validate() checked that the manifest's tokenizer is data.tokenizer
  if not data_cfg.mixture:
    return split_documents(data_cfg.path, split)
  entries = parse_mixture(data_cfg)
  return Mixture({name: split_documents(directory, split) for name, _, directory in entries},
                 {name: weight for name, weight, _ in entries})


def _check_shards(directory: str, split: str, info: dict) -> list[str]:
  from array_record.python.array_record_module import ArrayRecordReader
  errors = []
  for shard in info["shards"]:
    path = os.path.join(directory, shard["file"])
    fix = (f"re-create it with the same `moejax data prepare` command into a new --out (or delete {path}, "
           f"its line in {MANIFEST} and .prepare/ to redo only that shard)")
    if not os.path.isfile(path):
      errors.append(f"{split} shard {path} listed in {os.path.join(directory, MANIFEST)} is missing; {fix}.")
      continue
    size = os.path.getsize(path)
    if size != shard["bytes"]:
      errors.append(f"{split} shard {path} has {size} bytes, the manifest says {shard['bytes']} (truncated or "
                    f"overwritten); {fix}.")
      continue
    try:
      reader = ArrayRecordReader(path)
      records = reader.num_records()
      reader.close()
    except Exception as err:  # noqa: BLE001 — the C++ reader raises bare RuntimeError/ValueError
      errors.append(f"{split} shard {path} is not a readable ArrayRecord file ({err}); {fix}.")
      continue
    if records != shard["records"]:
      errors.append(f"{split} shard {path} has {records} records, the manifest says {shard['records']}; {fix}.")
  return errors


def validate_pipeline(cfg) -> list[str]:
  """The pipeline fields every source shares: ``data.workers``, and ``data.mixture`` only with array_record."""
  d, e = cfg.data, []
  if d.workers < 0:
    e.append(f"data.workers={d.workers} must be >= 0 (0 reads in the training process).")
  if d.mixture and d.source != "array_record":
    e.append(f"data.mixture is set but data.source={d.source!r}; use --config.data.source=array_record.")
  return e


def validate(cfg) -> list[str]:
  """Every problem with the ``data.*`` fields of the array_record source (empty when fine).

  Checks, before anything is compiled or written: ``data.path`` / ``data.mixture``,
  each directory's manifest and shards (present, sizes, record counts), that the
  manifest's tokenizer is ``data.tokenizer`` and fits ``model.vocab_size``, and that
  the train split (and the validation split when ``train.eval_every > 0``) is non-empty.
  """
  d = cfg.data
  e: list[str] = []
  if not d.path and not d.mixture:
    return e + ["data.source='array_record' needs data.path=DIR (written by `moejax data prepare --out DIR`) "
                "or data.mixture='NAME=WEIGHT:DIR,...'."]
  try:
    dirs = directories(d)
  except ValueError as err:
    return e + [str(err)]
  from moejax.data.tokenizers import get_tokenizer
  try:
    wanted = tokenizer_identity(d.tokenizer, get_tokenizer(d.tokenizer))
  except (OSError, ValueError, ImportError):
    return e  # config.validate reports data.tokenizer itself
  splits = ("train", "validation") if cfg.train.eval_every > 0 else ("train",)
  for name, (_, directory) in dirs.items():
    where = f"data.mixture source {name!r}: " if name else "data.path: "
    if name and not os.path.isdir(directory):
      known = sorted(n for n in os.listdir(d.path) if os.path.isfile(os.path.join(d.path, n, MANIFEST))) \
          if d.path and os.path.isdir(d.path) else []
      e.append(f"{where}unknown source, {directory} does not exist; prepared sources"
               f"{' in ' + d.path if d.path else ''}: {known or 'none'}.")
      continue
    try:
      manifest = load_manifest(directory)
    except ValueError as err:
      e.append(where + str(err))
      continue
    got, path = manifest["tokenizer"], os.path.join(directory, MANIFEST)
    if got["sha256"] != wanted["sha256"]:
      e.append(f"{where}{path} was tokenized with {got['spec']!r} (vocab {got['vocab_size']}), not with "
               f"data.tokenizer={d.tokenizer!r}; set --config.data.tokenizer to that tokenizer or prepare the "
               "corpus again with --tokenizer set to the model's.")
    max_id = max((manifest["splits"][s]["max_id"] for s in ("train", "validation")), default=-1)
    if max_id >= cfg.model.vocab_size:
      e.append(f"{where}{path} holds token id {max_id} but model.vocab_size={cfg.model.vocab_size}; set "
               f"--config.model.vocab_size={got['vocab_size']} or use the model's tokenizer.")
    for split in splits:
      info = manifest["splits"][split]
      if info["tokens"] < d.seq_len + 1:
        fix = ("rerun prepare with --val-fraction > 0 or more files, or set --config.train.eval_every=0"
               if split == "validation" else "add input files to prepare")
        e.append(f"{where}the {split} split of {directory} has {info['tokens']} tokens, fewer than data.seq_len + 1 = "
                 f"{d.seq_len + 1}; {fix}.")
      elif info["documents"] < d.shards:
        e.append(f"{where}the {split} split of {directory} has {info['documents']} documents, fewer than "
                 f"data.shards={d.shards}; lower data.shards or add data.")
      e.extend(where + msg for msg in _check_shards(directory, split, info))
  return e


SOURCES.register("array_record", validate_config=validate)(array_record_source)
