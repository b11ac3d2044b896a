"""The grain input pipeline: documents -> chunks -> packed rows -> batches.

Per process, for a source of documents (see ``moejax/data/source.py``)::

    documents[process_index::process_count]      disjoint shard per process
    -> shuffle, reshuffled every epoch            train: by seed; validation: a fixed
                                                  order, the same for every seed
    -> repeat forever
    -> chunks of <= seq_len + 1 tokens            consecutive chunks share one token,
                                                  so every target is predicted once
    (a Mixture: the steps above per source, then
    -> grain IterDataset.mix by weight)           each source keeps its own position
    -> window shuffle of chunks                   train only: mixes long documents;
                                                  window <= 2**18 tokens and <= 1 epoch
    -> first-fit packing into seq_len rows        grain FirstFitPackIterDataset
    -> batches of batch_size rows

Each step is a grain iterator, so ``get_state()``/``set_state()`` resume
bit-exactly and the iterator can be saved with ``grain.checkpoint``.
By default everything runs in the calling thread; ``data.workers > 0`` moves
the pipeline into grain worker processes (``mp_prefetch``). Either way the same
config and seed give identical batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np
from absl import flags

from moejax.data.array_record import mixture_names
from moejax.data.source import SOURCES, Document, Mixture, check_split
from moejax.data.tokenizers import get_tokenizer

SHUFFLE_WINDOW_TOKENS = 2**18  # train: chunks are shuffled within windows of this many tokens
VALIDATION_SEED = 0            # validation order is fixed, independent of the run's seed


class ChunkDocument(grain.experimental.FlatMapTransform):
  """Document -> next-token chunks of at most ``seq_len`` positions.

  Chunk k covers tokens ``[k*seq_len, (k+1)*seq_len + 1)`` of the document and
  gives ``inputs = tokens[:-1]``, ``targets = tokens[1:]``, ``weights =
  weights[1:]`` (each int32/float32 ``[n]``, n <= seq_len), and in a mixture
  ``sources``: int32 ``[n]`` filled with the source's index.
  """

  def __init__(self, seq_len: int, source_index: int | None = None):
    self.seq_len, self.source_index = seq_len, source_index

  def flat_map(self, doc: Document) -> list[dict[str, np.ndarray]]:
    tokens, weights = doc["tokens"], doc["weights"]
    chunks = []
    for start in range(0, len(tokens) - 1, self.seq_len):
      stop = min(start + self.seq_len + 1, len(tokens))
      chunk = {"inputs": tokens[start:stop - 1], "targets": tokens[start + 1:stop],
               "weights": weights[start + 1:stop]}
      if self.source_index is not None:
        chunk["sources"] = np.full(stop - 1 - start, self.source_index, np.int32)
      chunks.append(chunk)
    return chunks


def _as_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed names -> our batch names (every feature shares segments)."""
  batch = {"inputs": packed["inputs"], "targets": packed["targets"],
           "weights": packed["weights"], "segment_ids": packed["inputs_segment_ids"],
           "positions": packed["inputs_positions"]}
  if "sources" in packed:
    batch["sources"] = packed["sources"]
  return batch


def _seeds(seed: int, stream: int = 0) -> tuple[int, int]:
  """Independent 32-bit seeds for the document shuffle (of source ``stream``) and the chunk window shuffle."""
  if seed < 0:
    raise ValueError(f"seed={seed} must be >= 0.")
  document_seed, window_seed = np.random.SeedSequence(seed).generate_state(2)
  if stream:
    document_seed = np.random.SeedSequence([seed, stream]).generate_state(1)[0]
  return int(document_seed), int(window_seed)


def _chunks(source: Sequence[Document], *, split: str, seq_len: int, seed: int, process_index: int,
            process_count: int, stream: int = 0, source_index: int | None = None
            ) -> tuple[grain.IterDataset, int]:
  """(endless chunk stream of this process's document shard, documents in the shard)."""
  if len(source) < process_count:
    raise ValueError(f"the {split} split has {len(source)} documents, fewer than the "
                     f"{process_count} processes that each need a shard; add data or use fewer "
                     "processes.")
  document_seed, _ = _seeds(seed, stream)
  shard = grain.MapDataset.source(source)[process_index::process_count]
  it = shard.shuffle(seed=document_seed).repeat().to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # in this thread: deterministic
  return grain.experimental.FlatMapIterDataset(it, ChunkDocument(seq_len, source_index)), len(shard)


def build_dataset(source: Sequence[Document] | Mixture, *, split: str, seq_len: int, batch_size: int,
                  seed: int, pad_id: int = 0, process_index: int = 0, process_count: int = 1,
                  workers: int = 0) -> grain.IterDataset:
  """The batched IterDataset over ``source``; see :func:`make_iterator`.

  A :class:`Mixture` chunks each source on its own (seeds derived from ``seed`` and
  the source's index) and mixes the chunk streams by weight before the window
  shuffle; its batches carry ``sources`` (int32 ``[B, T]``, -1 on padding).
  ``workers > 0`` runs the pipeline in that many grain worker processes
  (``mp_prefetch``): deterministic and checkpointable, but a different batch order
  than ``workers=0`` (each worker packs its own slice of the documents).
  """
  check_split(split)
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1.")
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count}).")
  seed = seed if split == "train" else VALIDATION_SEED
  shard_args = dict(split=split, seq_len=seq_len, seed=seed, process_index=process_index,
                    process_count=process_count)
  lengths = {"inputs": seq_len, "targets": seq_len, "weights": seq_len}
  padding = {"inputs": pad_id, "targets": pad_id, "weights": 0.0}
  if isinstance(source, Mixture):
    streams = {name: _chunks(docs, stream=i + 1, source_index=i, **shard_args)
               for i, (name, docs) in enumerate(source.sources.items())}
    it = grain.IterDataset.mix({name: s for name, (s, _) in streams.items()}, dict(source.weights))
    documents = sum(n for _, n in streams.values())
    lengths["sources"], padding["sources"] = seq_len, -1
  else:
    it, documents = _chunks(source, **shard_args)
  if split == "train":
    # At most one epoch of chunks per window (each document gives >= 1 chunk).
    window = max(1, min(SHUFFLE_WINDOW_TOKENS // seq_len, documents))
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=window, seed=_seeds(seed)[1])
  # One packing group is exactly one batch: batch_size bins, all non-empty when emitted.
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct=lengths, num_packing_bins=batch_size, shuffle_bins=False, padding_struct=padding)
  it = it.batch(batch_size, drop_remainder=True).map(_as_batch)
  if workers:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain workers read absl flags; moejax parses its own FlagValues
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def make_iterator(data_cfg, *, split: str, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of packed batches for this process.

  Yields dicts of numpy arrays, each ``[B, T]`` with B = ``batch_size`` (per
  process) and T = ``data_cfg.seq_len``:

  * ``inputs`` int32, ``targets`` int32: ``targets[b, t]`` is the token after
    ``inputs[b, t]`` in the same document;
  * ``weights`` float32: the loss weight of ``targets`` (0 on padding and
    where the document gives weight 0);
  * ``segment_ids`` int32: 1, 2, ... per packed document chunk, 0 on padding;
  * ``positions`` int32: the position within the document chunk (for RoPE);
  * ``sources`` int32 (mixtures only): the index of the source in ``data.mixture``.

  ``split="train"`` shuffles with ``seed`` (a fresh order every epoch);
  ``split="validation"`` has a fixed order independent of ``seed``. Both
  repeat forever and are sharded by document over processes. ``data.workers``
  grain worker processes produce the batches (0: this thread).
  """
  tokenizer = get_tokenizer(data_cfg.tokenizer)
  source = SOURCES.get(data_cfg.source)(data_cfg, split, tokenizer)
  ds = build_dataset(source, split=split, seq_len=data_cfg.seq_len, batch_size=batch_size,
                     seed=seed, pad_id=tokenizer.pad_id, process_index=process_index,
                     process_count=process_count, workers=data_cfg.get("workers", 0) if split == "train" else 0)
  return iter(ds)


class ShardedBatches:
  """The global batch assembled from ``num_shards`` independent data shards.

  Shard s is the document shard ``s`` of ``num_shards`` (see
  :func:`make_iterator`) and fills rows ``[s*B/S, (s+1)*B/S)`` of every global
  batch of B rows. A process owns a contiguous run of shards, so the batches
  of a run depend on ``num_shards`` but not on how many processes share the
  work: 2 processes with 4 devices each see exactly the data of 1 process with
  8 devices. Yields this process's rows ``[B * owned / S, T]``.

  Its position is per shard (:meth:`shard_states`), so a checkpoint restores
  onto any number of processes that divides ``num_shards``.
  """

  def __init__(self, data_cfg, *, split: str, global_batch: int, seed: int, num_shards: int,
               process_index: int = 0, process_count: int = 1):
    if num_shards % process_count or global_batch % num_shards:
      raise ValueError(f"data.shards={num_shards} must be a multiple of the {process_count} processes "
                       f"and divide the global batch of {global_batch} rows.")
    owned = num_shards // process_count
    self.num_shards = num_shards
    self.source_names = mixture_names(data_cfg)
    self._iterators = {
        shard: make_iterator(data_cfg, split=split, batch_size=global_batch // num_shards, seed=seed,
                             process_index=shard, process_count=num_shards)
        for shard in range(process_index * owned, (process_index + 1) * owned)}
    # Mixtures: tokens (non-padding positions) drawn so far from each source, per data shard.
    self._source_tokens = {shard: [0] * len(self.source_names) for shard in self._iterators}

  def __iter__(self) -> "ShardedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = {shard: next(it) for shard, it in self._iterators.items()}
    for shard, part in parts.items():
      sources = part.pop("sources", None)
      if sources is not None:
        counts = np.bincount(sources[sources >= 0], minlength=len(self.source_names))
        self._source_tokens[shard] = [a + int(b) for a, b in zip(self._source_tokens[shard], counts)]
    first = next(iter(parts.values()))
    return {k: np.concatenate([p[k] for p in parts.values()]) for k in first}

  def source_tokens(self) -> dict[str, int]:
    """{"data_tokens_NAME": tokens drawn from mixture source NAME by this process's shards}."""
    return {f"data_tokens_{name}": sum(c[i] for c in self._source_tokens.values())
            for i, name in enumerate(self.source_names)}

  def shard_states(self) -> dict[str, dict]:
    """{"shard_S-of-N": grain iterator state} for the shards this process owns (and, for a
    mixture, {"source_tokens_S-of-N": {"tokens": [per source]}})."""
    states = {f"shard_{shard}-of-{self.num_shards}": it.get_state() for shard, it in self._iterators.items()}
    if self.source_names:
      states.update({f"source_tokens_{shard}-of-{self.num_shards}": {"tokens": counts}
                     for shard, counts in self._source_tokens.items()})
    return states

  def set_shard_states(self, states: dict[str, dict]) -> None:
    for shard, it in self._iterators.items():
      it.set_state(states[f"shard_{shard}-of-{self.num_shards}"])
      if self.source_names:
        self._source_tokens[shard] = list(states[f"source_tokens_{shard}-of-{self.num_shards}"]["tokens"])

  def close(self) -> None:
    """Stops grain worker processes (data.workers > 0); a no-op otherwise."""
    for it in self._iterators.values():
      if hasattr(it, "close"):
        it.close()
