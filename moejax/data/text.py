"""Text sources: the interpreter's standard library, and user files.

Each text is one document, ``bos + encode(text) + eos``, with weight 1 on every
position but the bos (nothing predicts the bos). Texts are tokenized lazily, on
access, so start-up only reads files.

Train/validation split: by *file*, from a stable hash of the file's relative
path (blake2b, the same on every machine and Python version; adding a file
moves no other file): a file is held out iff ``hash(path) < val_fraction``.
``data.source="files"`` with a single file splits its documents the same way,
keyed by ``path:line``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Sequence

import numpy as np

from moejax.data.source import SOURCES, Document, check_split, document
from moejax.data.tokenizers import Tokenizer
from moejax.registry import Registry

log = logging.getLogger(__name__)

STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})


class TextDocuments(Sequence[Document]):
  """Documents ``bos + encode(texts[i]) + eos``; ``names[i]`` says where each came from."""

  def __init__(self, texts: Sequence[str], names: Sequence[str], tokenizer: Tokenizer,
               skipped: Sequence[str] = ()):
    self.texts, self.names, self.skipped = texts, list(names), tuple(skipped)
    self._tokenizer = tokenizer

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int) -> Document:
    ids = self._tokenizer.encode(self.texts[index])
    tokens = np.empty(len(ids) + 2, np.int32)
    tokens[0], tokens[1:-1], tokens[-1] = self._tokenizer.bos_id, ids, self._tokenizer.eos_id
    weights = np.ones(len(tokens), np.float32)
    weights[0] = 0.0
    return document(tokens, weights)


def _hash_fraction(key: str) -> float:
  """A stable pseudo-uniform number in [0, 1) for ``key``."""
  digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


def validation_mask(keys: Sequence[str], val_fraction: float) -> np.ndarray:
  """bool[n]: which of n split units (files, or documents) are held out.

  Unit i is held out iff ``hash(keys[i]) < val_fraction``. With two or more
  units and ``val_fraction > 0`` each split gets at least one unit (the
  smallest hash is held out, the largest kept); a single unit always trains.
  """
  hashes = np.array([_hash_fraction(k) for k in keys])
  mask = hashes < val_fraction
  if len(keys) >= 2 and val_fraction > 0:
    mask[np.argmin(hashes)] = True
    mask[np.argmax(hashes)] = False
  elif len(keys) == 1:
    mask[0] = False
  return mask


def _select(split: str, keys: Sequence[str], val_fraction: float, what: str) -> np.ndarray:
  """bool[n]: the units of ``split``; raises when the split would be empty."""
  check_split(split)
  held_out = validation_mask(keys, val_fraction)
  chosen = held_out if split == "validation" else ~held_out
  if not chosen.any():
    raise ValueError(
        f"the {split} split of {what} is empty ({len(keys)} file(s) or document(s) to split, "
        f"data.val_fraction={val_fraction}); set data.val_fraction > 0 with at least two files "
        "or documents, or disable evaluation with --config.train.eval_every=0.")
  return chosen


class _FileTexts(Sequence[str]):
  """The UTF-8 texts of ``root/relpaths[i]``, read on access."""

  def __init__(self, root: str, relpaths: Sequence[str]):
    self._root, self._relpaths = root, list(relpaths)

  def __len__(self) -> int:
    return len(self._relpaths)

  def __getitem__(self, index: int) -> str:
    with open(os.path.join(self._root, self._relpaths[index]), encoding="utf-8") as f:
      return f.read()


@functools.lru_cache(maxsize=1)
def _stdlib_scan() -> tuple[str, tuple[str, ...], tuple[str, ...]]:
  """(root, sorted relative paths of UTF-8 ``*.py`` files, those skipped as non-UTF-8)."""
  root = sysconfig.get_paths()["stdlib"]
  good, bad = [], []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
    for name in filenames:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
          data = f.read()
        try:
          data.decode("utf-8")
        except UnicodeDecodeError:
          bad.append(os.path.relpath(path, root))
        else:
          good.append(os.path.relpath(path, root))
  if not good:
    raise ValueError(f"data.source='stdlib' found no .py files under {root!r}; this interpreter "
                     "ships without its library sources, so use data.source='files'.")
  log.info("stdlib source: %d .py files under %s, %d skipped as not UTF-8: %s",
           len(good), root, len(bad), ", ".join(sorted(bad)))
  return root, tuple(sorted(good)), tuple(sorted(bad))


def _top_level(relpath: str) -> str:
  """'email/mime/text.py' -> 'email'; 'json.py'... -> 'json'."""
  first = relpath.split(os.sep, 1)[0]
  return first[:-3] if first.endswith(".py") else first


@SOURCES.register("stdlib")
def stdlib_source(data_cfg, split: str, tokenizer: Tokenizer) -> TextDocuments:
  """The ``*.py`` files of the running interpreter's standard library, one per document
  (only those of the top-level packages in ``data.stdlib_packages``, if set)."""
  root, relpaths, skipped = _stdlib_scan()
  wanted = {p.strip() for p in data_cfg.stdlib_packages.split(",") if p.strip()}
  if wanted:
    relpaths = [p for p in relpaths if _top_level(p) in wanted]
    found = {_top_level(p) for p in relpaths}
    if wanted - found:
      raise ValueError(f"data.stdlib_packages names {sorted(wanted - found)}, which have no .py files "
                       f"under {root!r}; use top-level names such as 'email,json,asyncio'.")
  chosen = _select(split, relpaths, data_cfg.val_fraction, "data.source='stdlib'")
  names = [p for p, c in zip(relpaths, chosen) if c]
  return TextDocuments(_FileTexts(root, names), names, tokenizer, skipped=skipped)


# A file format reads a file's text into (document name, document text) pairs.
FileReader = Callable[[str, str, str], list[tuple[str, str]]]
FILE_FORMATS: Registry[FileReader] = Registry("data file format")


@FILE_FORMATS.register(".txt")
def _read_txt(name: str, text: str, field: str) -> list[tuple[str, str]]:
  del field
  return [(name, text)] if text.strip() else []


@FILE_FORMATS.register(".jsonl")
def _read_jsonl(name: str, text: str, field: str) -> list[tuple[str, str]]:
  docs = []
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise ValueError(f"data.files: {name} line {number} is not valid JSON ({err}); fix or "
                       "remove that line.") from err
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise ValueError(f"data.files: {name} line {number} has no string field {field!r} "
                       f"(found: {keys}); set --config.data.jsonl_field to the text field.")
    if record[field].strip():
      docs.append((f"{name}:{number}", record[field]))
  return docs


def _read_utf8(path: str) -> str:
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as err:
    raise ValueError(f"data.files: {path} is not UTF-8 (invalid byte 0x{data[err.start]:02x} at "
                     f"byte offset {err.start}); convert it (e.g. `iconv -t UTF-8`) or drop it "
                     "from data.files.") from err


def _expand_globs(spec: str) -> list[str]:
  """Sorted absolute paths matched by the comma-separated globs of ``data.files``."""
  patterns = [p.strip() for p in spec.split(",") if p.strip()]
  if not patterns:
    raise ValueError("data.files is empty; set it to comma-separated globs of .txt/.jsonl "
                     "files, e.g. --config.data.files='corpus/*.txt'.")
  paths = set()
  for pattern in patterns:
    matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
               if os.path.isfile(p)]
    if not matched:
      raise ValueError(f"data.files: {pattern!r} matched no file (working directory "
                       f"{os.getcwd()!r}); fix the glob or use an absolute path.")
    paths.update(os.path.abspath(p) for p in matched)
  for path in paths:
    suffix = os.path.splitext(path)[1]
    if suffix not in FILE_FORMATS:
      raise ValueError(f"data.files matched {path}, whose suffix {suffix!r} is not one of "
                       f"{FILE_FORMATS.names()}; narrow the glob.")
  return sorted(paths)


def _validate_files(cfg) -> list[str]:
  """``data.files`` must name something to read."""
  if cfg.data.files.strip():
    return []
  return ["data.source='files' needs data.files, e.g. --config.data.files='corpus/*.txt'."]


@SOURCES.register("files", validate_config=_validate_files)
def files_source(data_cfg, split: str, tokenizer: Tokenizer) -> TextDocuments:
  """User text: each ``.txt`` file, and each line of a ``.jsonl`` file, is a document."""
  paths = _expand_globs(data_cfg.files)
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  per_file = []
  for path in paths:
    rel = os.path.relpath(path, root)
    suffix = os.path.splitext(path)[1]
    docs = FILE_FORMATS.get(suffix)(rel, _read_utf8(path), data_cfg.jsonl_field)
    if not docs:
      raise ValueError(f"data.files: {path} holds no documents (it is empty or blank); fill it "
                       "or drop it from data.files.")
    per_file.append((rel, docs))
  # Several files: split by file. One file: split its documents.
  units = ([(rel, docs) for rel, docs in per_file] if len(per_file) > 1
           else [(name, [(name, text)]) for name, text in per_file[0][1]])
  chosen = _select(split, [key for key, _ in units], data_cfg.val_fraction,
                   f"data.files={data_cfg.files!r}")
  docs = [doc for (_, unit_docs), c in zip(units, chosen) if c for doc in unit_docs]
  total = sum(len(tokenizer.encode(text)) + 2 for _, text in docs)  # + bos, eos
  if total < data_cfg.seq_len + 1:
    raise ValueError(f"data.seq_len={data_cfg.seq_len} is longer than the whole {split} split of "
                     f"data.files ({total} tokens); lower --config.data.seq_len or add data.")
  return TextDocuments([t for _, t in docs], [n for n, _ in docs], tokenizer)
