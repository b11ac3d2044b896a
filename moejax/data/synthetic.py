"""Synthetic long-context tasks, generated on the fly by example index.

Each example is ``bos + context + answer`` of at most ``length`` tokens
(``data.task_length``), with weight 1 on the answer tokens only, so the loss
(and accuracy) measures recall from the context alone. Text pieces are
encoded with the configured tokenizer, so the tasks work with any tokenizer.
With the byte tokenizer passkey is exactly ``length`` tokens, copy is within
one token of it, and mqar is short by less than one queried pair.

Example ``i`` of split ``s`` is a pure function of ``(task, s, i)``: it draws
from ``np.random.default_rng([task stream, split id, i])``, so validation uses
a different stream than train and never depends on the run's seed (the train
iterator's seed only picks the order of the 2**20 examples).

* ``passkey`` (Mohtashami & Jaggi, 2023, "Landmark Attention"): repeated
  filler sentences with ``The pass key is NNNNN. Remember it.`` at a random
  depth, ending ``What is the pass key? The pass key is NNNNN``.
* ``mqar`` (Arora et al., 2023, "Zoology"): key-value pairs ``" ab:17"``,
  then ``" |"``, then queries of a random subset of the keys, in random order;
  the answers are their values.
* ``copy``: a random letter string, ``"|"``, the same string again (the
  answer); an induction-head probe.
"""

from __future__ import annotations

import hashlib
import itertools
import string
from collections.abc import Callable, Sequence

import numpy as np

from moejax.data.source import SOURCES, SPLITS, Document, check_split, document
from moejax.data.tokenizers import Tokenizer

NUM_EXAMPLES = 2**20  # examples per epoch; each is generated from its index
# An example is (tokens int32[n], weights float32[n]) drawn with a Generator.
Example = tuple[np.ndarray, np.ndarray]


def _assemble(bos: int, pieces: Sequence[tuple[np.ndarray, float]]) -> Example:
  """bos followed by ``pieces`` of (tokens, weight), as one example."""
  tokens = np.concatenate([[bos], *(t for t, _ in pieces)]).astype(np.int32)
  weights = np.repeat(np.array([0.0, *(w for _, w in pieces)], np.float32),
                      [1, *(len(t) for t, _ in pieces)])
  return tokens, weights


def _too_short(task: str, length: int, needed: int) -> ValueError:
  return ValueError(f"data.task_length={length} is too short for the {task} task, which needs "
                    f"at least {needed} tokens with this tokenizer; raise data.task_length.")


class Passkey:
  """Filler text hiding a 5-digit pass key; the answer is the key."""

  FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
            "Here we go.", "There and back again.")
  DIGITS = 5

  def __init__(self, tokenizer: Tokenizer, length: int):
    self._tok, self._length = tokenizer, length
    enc = tokenizer.encode
    self._key_prefix, self._key_suffix = enc(" The pass key is "), enc(". Remember it.")
    self._question = enc(" What is the pass key? The pass key is ")
    sentences = [enc(" " + s) for s in self.FILLER]
    # One filler stream long enough for any example, and its sentence starts.
    reps = length // min(len(s) for s in sentences) + 1
    stream = list(itertools.islice(itertools.cycle(sentences), reps))
    self._filler = np.concatenate(stream)
    self._sentence_starts = np.cumsum([0] + [len(s) for s in stream])
    self._fixed = 1 + len(self._key_prefix) + len(self._key_suffix) + len(self._question)
    needed = self._fixed + 2 * len(enc("0" * self.DIGITS))
    if needed > length:
      raise _too_short("passkey", length, needed)

  def __call__(self, rng: np.random.Generator, depth: float | None = None) -> Example:
    """An example with the key at a random sentence start, or at the one nearest
    ``depth`` (a fraction of the filler: 0 = first, 1 = last)."""
    key = self._tok.encode("".join(map(str, rng.integers(0, 10, self.DIGITS))))
    budget = max(0, self._length - self._fixed - 2 * len(key))
    starts = self._sentence_starts[self._sentence_starts <= budget]
    depth = rng.choice(starts) if depth is None else starts[np.abs(starts - depth * budget).argmin()]
    return _assemble(self._tok.bos_id, [
        (self._filler[:depth], 0.0), (self._key_prefix, 0.0), (key, 0.0),
        (self._key_suffix, 0.0), (self._filler[depth:budget], 0.0), (self._question, 0.0),
        (key, 1.0)])


class MQAR:
  """Multi-query associative recall: key-value pairs, then queries of some keys."""

  SEPARATOR = " |"
  QUERY_PROBABILITY = 0.5
  NUM_VALUES = 100  # values are two digits, "00" to "99"
  DRAWS = 64        # candidate pairs drawn per Generator call

  def __init__(self, tokenizer: Tokenizer, length: int):
    self._tok, self._length = tokenizer, length
    self._separator = tokenizer.encode(self.SEPARATOR)
    self._values = [tokenizer.encode(f"{v:02d}") for v in range(self.NUM_VALUES)]
    # Keys: the shortest lowercase strings with at least ``length`` distinct values.
    self._key_letters = next(n for n in itertools.count(2) if 26**n >= length)
    pair = len(self._key(0)) + len(self._values[0])
    if 1 + len(self._separator) + 2 * pair > length:
      raise _too_short("mqar", length, 1 + len(self._separator) + 2 * pair)

  def _key(self, index: int) -> np.ndarray:
    """The ids of ``" abc:"``, key number ``index`` spelled in base 26."""
    letters = (string.ascii_lowercase[(index // 26**j) % 26] for j in range(self._key_letters))
    return self._tok.encode(" " + "".join(letters) + ":")

  def _draws(self, rng: np.random.Generator):
    """Endless (key index, value, queried) triples with distinct keys."""
    seen = set()
    while True:
      keys = rng.integers(26**self._key_letters, size=self.DRAWS).tolist()
      values = rng.integers(self.NUM_VALUES, size=self.DRAWS).tolist()
      queried = (rng.random(self.DRAWS) < self.QUERY_PROBABILITY).tolist()
      for key, value, query in zip(keys, values, queried):
        if key not in seen:
          seen.add(key)
          yield key, value, query

  def __call__(self, rng: np.random.Generator) -> Example:
    budget = self._length - 1 - len(self._separator)
    pairs, queried = [], []
    for key, value, query in self._draws(rng):
      query = query or not pairs  # at least one query; context order is shuffled below
      pair = (self._key(key), self._values[value])
      cost = (len(pair[0]) + len(pair[1])) * (2 if query else 1)
      if cost > budget:
        break
      budget -= cost
      pairs.append(pair)
      queried.append(query)
    context = [pairs[i] for i in rng.permutation(len(pairs))]
    asked = [pairs[i] for i in rng.permutation(np.flatnonzero(queried))]
    return _assemble(self._tok.bos_id,
                     [(ids, 0.0) for pair in context for ids in pair] + [(self._separator, 0.0)]
                     + [piece for k, v in asked for piece in ((k, 0.0), (v, 1.0))])


class Copy:
  """A random lowercase string, a separator, then the same string (the answer)."""

  SEPARATOR = "|"

  def __init__(self, tokenizer: Tokenizer, length: int):
    self._tok = tokenizer
    self._separator = tokenizer.encode(self.SEPARATOR)
    self._segment = (length - 1 - len(self._separator)) // 2
    if self._segment < 1:
      raise _too_short("copy", length, 3 + len(self._separator))

  def __call__(self, rng: np.random.Generator) -> Example:
    letters = rng.integers(0, 26, self._segment)
    segment = self._tok.encode("".join(string.ascii_lowercase[i] for i in letters))
    segment = segment[:self._segment]
    return _assemble(self._tok.bos_id, [(segment, 0.0), (self._separator, 0.0), (segment, 1.0)])


class SyntheticTask(Sequence[Document]):
  """``NUM_EXAMPLES`` documents; document ``i`` is ``make_example(rng(i))``."""

  def __init__(self, name: str, split: str, make_example: Callable[[np.random.Generator], Example]):
    check_split(split)
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=4).digest()
    self._stream = (int.from_bytes(digest, "little"), SPLITS.index(split))
    self._make_example = make_example

  def __len__(self) -> int:
    return NUM_EXAMPLES

  def __getitem__(self, index: int) -> Document:
    if not 0 <= index < NUM_EXAMPLES:
      raise IndexError(f"example {index} is outside [0, {NUM_EXAMPLES}).")
    return document(*self._make_example(np.random.default_rng([*self._stream, index])))


def _factory(name: str, task: Callable[[Tokenizer, int], Callable[[np.random.Generator], Example]]):
  """The SOURCES entry for ``task``: ``(data_cfg, split, tokenizer) -> SyntheticTask``."""

  def make(data_cfg, split: str, tokenizer: Tokenizer) -> SyntheticTask:
    if data_cfg.task_length > data_cfg.seq_len + 1:
      raise ValueError(
          f"data.task_length={data_cfg.task_length} does not fit one sequence of "
          f"data.seq_len={data_cfg.seq_len} (+1 for the shifted target), so the answer would "
          f"lose its context; set data.seq_len >= {data_cfg.task_length - 1}.")
    return SyntheticTask(name, split, task(tokenizer, data_cfg.task_length))

  return make


def validate_task_length(cfg) -> list[str]:
  """``data.task_length`` of the synthetic tasks: an example fits one packed row."""
  d = cfg.data
  if 1 <= d.task_length <= d.seq_len + 1:
    return []
  return [f"data.task_length={d.task_length} must be in [1, data.seq_len + 1 = {d.seq_len + 1}] so an "
          f"example's answer stays in the same row as its context; raise data.seq_len or lower it."]


SOURCES.register("passkey", validate_config=validate_task_length)(_factory("passkey", Passkey))
SOURCES.register("mqar", validate_config=validate_task_length)(_factory("mqar", MQAR))
SOURCES.register("copy", validate_config=validate_task_length)(_factory("copy", Copy))
