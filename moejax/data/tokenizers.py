"""Tokenizers, selected by ``data.tokenizer``.

``"byte"``
    Built in: pad=0, bos=1, eos=2, byte ``b`` -> id ``b + 3``; vocab 259.
``path/to/x.model``
    A SentencePiece model (needs ``pip install sentencepiece``).
``path/to/x.json``
    A Hugging Face ``tokenizers`` file (needs ``pip install tokenizers``).
``path/to/DIR``
    The ``tokenizer.json`` (else ``tokenizer.model``) in DIR or in ``DIR/tokenizer/``:
    a Hugging Face checkpoint, or a workdir written by ``moejax convert --from-hf``.

Every tokenizer has the same small interface: ``encode(text) -> int32[n]``
(no bos/eos added; sources add them), ``decode(ids) -> str`` (special ids
dropped), ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``. A model without
a bos piece uses its eos piece as the document separator, and vice versa;
``pad_id`` (what padded batch positions hold; they always carry weight 0) is
the model's pad piece, else 0.

A new format is one loader plus one registry line::

    @TOKENIZERS.register(".vocab")
    def _load_vocab(path: str) -> Tokenizer: ...
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from moejax.registry import Registry


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray:
    """Text -> int32[n] ids, without bos/eos."""

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """ids -> text; pad/bos/eos ids are dropped."""


# Keyed by "byte" or by a file suffix (".model", ".json"); each entry maps the
# ``data.tokenizer`` string to a Tokenizer.
TOKENIZERS: Registry[Callable[[str], Tokenizer]] = Registry("tokenizer")


class ByteTokenizer:
  """UTF-8 bytes: id = byte + 3, after pad=0, bos=1, eos=2."""

  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, np.int64)
    data = ids[(ids >= self.offset) & (ids < self.vocab_size)] - self.offset
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@TOKENIZERS.register("byte")
def _load_byte(spec: str) -> Tokenizer:
  del spec
  return ByteTokenizer()


def _import_optional(module: str, spec: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as err:
    raise ImportError(
        f"data.tokenizer={spec!r} needs the `{module}` package: run `pip install {module}` "
        "(or `pip install 'moejax[tokenizers]'`), or use --config.data.tokenizer=byte.") from err


def _separators(spec: str, bos: int | None, eos: int | None) -> tuple[int, int]:
  """(bos, eos), each falling back to the other when the model lacks it."""
  if bos is None and eos is None:
    raise ValueError(
        f"data.tokenizer={spec!r} defines neither a bos nor an eos token, so documents "
        "cannot be delimited; add one (e.g. SentencePiece --bos_id=1 --eos_id=2, or a "
        "'</s>' special token) and retrain.")
  return (eos if bos is None else bos), (bos if eos is None else eos)


def _defined(piece_id: int) -> int | None:
  """SentencePiece marks a disabled special piece with id -1."""
  return None if piece_id < 0 else int(piece_id)


class SentencePieceTokenizer:
  """A SentencePiece ``.model`` file."""

  def __init__(self, path: str):
    spm = _import_optional("sentencepiece", path)
    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as err:
      raise ValueError(f"data.tokenizer={path!r} is not a valid SentencePiece model ({err}); "
                       "point it at the .model file written by SentencePieceTrainer.") from err
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id, self.eos_id = _separators(path, _defined(self._sp.bos_id()),
                                           _defined(self._sp.eos_id()))
    self.pad_id = _defined(self._sp.pad_id()) or 0

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._sp.decode([int(i) for i in ids])


TOKENIZERS.register(".model")(SentencePieceTokenizer)


class HFTokenizer:
  """A Hugging Face ``tokenizers`` JSON file (``Tokenizer.save``)."""

  BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "[CLS]")
  EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "[SEP]")
  PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")

  def __init__(self, path: str):
    tokenizers = _import_optional("tokenizers", path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as err:  # the Rust binding raises a bare Exception
      raise ValueError(f"data.tokenizer={path!r} is not a valid tokenizers JSON file ({err}); "
                       "point it at a file written by tokenizers.Tokenizer.save.") from err
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id, self.eos_id = _separators(path, self._first_id(self.BOS_NAMES),
                                           self._first_id(self.EOS_NAMES))
    self.pad_id = self._first_id(self.PAD_NAMES) or 0

  def _first_id(self, names: Sequence[str]) -> int | None:
    ids = (self._tok.token_to_id(n) for n in names)
    return next((int(i) for i in ids if i is not None), None)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


TOKENIZERS.register(".json")(HFTokenizer)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # in this order of preference


def resolve_tokenizer_path(spec: str) -> str:
  """``spec`` itself, or for a directory the tokenizer file in it (see the module docstring)."""
  if not os.path.isdir(spec):
    return spec
  for folder in (spec, os.path.join(spec, "tokenizer")):
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name)
  raise FileNotFoundError(f"data.tokenizer={spec!r} is a directory without {' or '.join(TOKENIZER_FILES)} "
                          "(in it or in its tokenizer/ folder); point it at the tokenizer file.")


def get_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by ``data.tokenizer`` ("byte", a .model/.json path, or a directory)."""
  spec = resolve_tokenizer_path(spec)
  key = spec if spec in TOKENIZERS else os.path.splitext(spec)[1]
  if key not in TOKENIZERS:
    raise ValueError(
        f"data.tokenizer={spec!r} is neither 'byte' nor a path ending in .model "
        "(SentencePiece) or .json (HF tokenizers); set --config.data.tokenizer=byte or "
        "to such a file.")
  if key != spec and not os.path.isfile(spec):
    raise FileNotFoundError(
        f"data.tokenizer={spec!r}: no such file; pass the path of an existing tokenizer "
        "file or use --config.data.tokenizer=byte.")
  return TOKENIZERS.get(key)(spec)


def tokenizer_vocab_size(spec: str) -> int:
  """The vocabulary size of ``get_tokenizer(spec)``."""
  return get_tokenizer(spec).vocab_size
