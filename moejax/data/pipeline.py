"""The grain input pipeline: documents -> chunks -> packed rows -> batches.

Per process, for a source of documents (see ``moejax/data/source.py``)::

    documents[process_index::process_count]      disjoint shard per process
    -> shuffle, reshuffled every epoch            train: by seed; validation: a fixed
                                                  order, the same for every seed
    -> repeat forever
    -> chunks of <= seq_len + 1 tokens            consecutive chunks share one token,
                                                  so every target is predicted once
    -> window shuffle of chunks                   train only: mixes long documents;
                                                  window <= 2**18 tokens and <= 1 epoch
    -> first-fit packing into seq_len rows        grain FirstFitPackIterDataset
    -> batches of batch_size rows

Each step is a grain iterator, so ``get_state()``/``set_state()`` resume
bit-exactly and the iterator can be saved with ``grain.checkpoint``.
Everything runs in the calling thread: the same config and seed give
identical batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from moejax.data.source import SOURCES, Document, check_split
from moejax.data.tokenizers import get_tokenizer

SHUFFLE_WINDOW_TOKENS = 2**18  # train: chunks are shuffled within windows of this many tokens
VALIDATION_SEED = 0            # validation order is fixed, independent of the run's seed


class ChunkDocument(grain.experimental.FlatMapTransform):
  """Document -> next-token chunks of at most ``seq_len`` positions.

  Chunk k covers tokens ``[k*seq_len, (k+1)*seq_len + 1)`` of the document and
  gives ``inputs = tokens[:-1]``, ``targets = tokens[1:]``, ``weights =
  weights[1:]`` (each int32/float32 ``[n]``, n <= seq_len).
  """

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, doc: Document) -> list[dict[str, np.ndarray]]:
    tokens, weights = doc["tokens"], doc["weights"]
    chunks = []
    for start in range(0, len(tokens) - 1, self.seq_len):
      stop = min(start + self.seq_len + 1, len(tokens))
      chunks.append({"inputs": tokens[start:stop - 1], "targets": tokens[start + 1:stop],
                     "weights": weights[start + 1:stop]})
    return chunks


def _as_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """grain's packed names -> our batch names (every feature shares segments)."""
  return {"inputs": packed["inputs"], "targets": packed["targets"],
          "weights": packed["weights"], "segment_ids": packed["inputs_segment_ids"],
          "positions": packed["inputs_positions"]}


def _seeds(seed: int) -> tuple[int, int]:
  """Independent 32-bit seeds for the document shuffle and the chunk window shuffle."""
  if seed < 0:
    raise ValueError(f"seed={seed} must be >= 0.")
  document_seed, window_seed = np.random.SeedSequence(seed).generate_state(2)
  return int(document_seed), int(window_seed)


def build_dataset(source: Sequence[Document], *, split: str, seq_len: int, batch_size: int,
                  seed: int, pad_id: int = 0, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """The batched IterDataset over ``source``; see :func:`make_iterator`."""
  check_split(split)
  if batch_size < 1 or seq_len < 1:
    raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1.")
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, process_count={process_count}).")
  if len(source) < process_count:
    raise ValueError(f"the {split} split has {len(source)} documents, fewer than the "
                     f"{process_count} processes that each need a shard; add data or use fewer "
                     "processes.")
  document_seed, window_seed = _seeds(seed if split == "train" else VALIDATION_SEED)
  shard = grain.MapDataset.source(source)[process_index::process_count]
  it = shard.shuffle(seed=document_seed).repeat().to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # in this thread: deterministic
  it = grain.experimental.FlatMapIterDataset(it, ChunkDocument(seq_len))
  if split == "train":
    # At most one epoch of chunks per window (each document gives >= 1 chunk).
    window = max(1, min(SHUFFLE_WINDOW_TOKENS // seq_len, len(shard)))
    it = grain.experimental.WindowShuffleIterDataset(it, window_size=window, seed=window_seed)
  # One packing group is exactly one batch: batch_size bins, all non-empty when emitted.
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
      num_packing_bins=batch_size, shuffle_bins=False,
      padding_struct={"inputs": pad_id, "targets": pad_id, "weights": 0.0})
  return it.batch(batch_size, drop_remainder=True).map(_as_batch)


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
  * ``positions`` int32: the position within the document chunk (for RoPE).

  ``split="train"`` shuffles with ``seed`` (a fresh order every epoch);
  ``split="validation"`` has a fixed order independent of ``seed``. Both
  repeat forever and are sharded by document over processes.
  """
  tokenizer = get_tokenizer(data_cfg.tokenizer)
  source = SOURCES.get(data_cfg.source)(data_cfg, split, tokenizer)
  ds = build_dataset(source, split=split, seq_len=data_cfg.seq_len, batch_size=batch_size,
                     seed=seed, pad_id=tokenizer.pad_id, process_index=process_index,
                     process_count=process_count)
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
    self._iterators = {
        shard: make_iterator(data_cfg, split=split, batch_size=global_batch // num_shards, seed=seed,
                             process_index=shard, process_count=num_shards)
        for shard in range(process_index * owned, (process_index + 1) * owned)}

  def __iter__(self) -> "ShardedBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iterators.values()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def shard_states(self) -> dict[str, dict]:
    """{"shard_S-of-N": grain iterator state} for the shards this process owns."""
    return {f"shard_{shard}-of-{self.num_shards}": it.get_state() for shard, it in self._iterators.items()}

  def set_shard_states(self, states: dict[str, dict]) -> None:
    for shard, it in self._iterators.items():
      it.set_state(states[f"shard_{shard}-of-{self.num_shards}"])
