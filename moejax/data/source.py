"""The data-source registry and the document format every source yields.

A source is a random-access sequence (``__len__``, ``__getitem__``) of
documents, built by a factory ``(data_cfg, split, tokenizer) -> source`` that
is registered under the ``data.source`` name::

    @SOURCES.register("my_corpus")
    def my_corpus(data_cfg, split, tokenizer):
      return [document(tokenizer.encode(t), np.ones(...)) for t in ...]

A document is ``{"tokens": int32[n], "weights": float32[n]}``: ``weights[i]``
is the loss weight for predicting ``tokens[i]`` from ``tokens[:i]`` (so
``weights[0]`` is never used). ``split`` is one of :data:`SPLITS`.

A source owns the checks of the ``data.*`` fields it reads:
``@SOURCES.register("name", validate_config=fn)`` with ``fn(cfg) -> list[str]``
(error messages naming the field, the value and the fix) runs when the
config selects it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from moejax.registry import Registry

SPLITS = ("train", "validation")


class Document(TypedDict):
  tokens: np.ndarray   # int32[n]
  weights: np.ndarray  # float32[n]


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Named document sources drawn with relative ``weights`` (a factory may return one).

  The pipeline chunks each source separately and mixes the chunk streams with grain
  (``IterDataset.mix``), so each source keeps its own position in a checkpoint.
  """
  sources: Mapping[str, Sequence[Document]]
  weights: Mapping[str, float]


SourceFactory = Callable[[Any, str, Any], "Sequence[Document] | Mixture"]
SOURCES: Registry[SourceFactory] = Registry("data source")


def document(tokens: Any, weights: Any) -> Document:
  """Builds a Document, checking that tokens[n] and weights[n] line up."""
  tokens = np.asarray(tokens, np.int32)
  weights = np.asarray(weights, np.float32)
  if tokens.ndim != 1 or tokens.shape != weights.shape:
    raise ValueError(f"a document needs 1-D tokens and weights of equal length, got "
                     f"{tokens.shape} and {weights.shape}.")
  return {"tokens": tokens, "weights": weights}


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}.")
