"""Data: tokenizers, document sources and the packed-batch pipeline.

* ``tokenizers.py``: ``get_tokenizer(data.tokenizer)`` (byte, SentencePiece, HF).
* ``source.py``: the ``SOURCES`` registry and the document format.
* ``text.py``: ``stdlib`` (this interpreter's standard library) and ``files``.
* ``array_record.py``: ``array_record`` (shards written by ``prepare.py``, mixtures).
* ``prepare.py``: ``moejax data prepare``, text files -> ArrayRecord shards + manifest.
* ``synthetic.py``: ``passkey``, ``mqar``, ``copy`` long-context tasks.
* ``pipeline.py``: ``make_iterator``, the grain pipeline yielding ``[B, T]`` batches
  of ``inputs, targets, weights, segment_ids, positions``.
"""

from moejax.data import array_record, synthetic, text  # noqa: F401  (importing them registers the sources)
from moejax.data.pipeline import ShardedBatches, make_iterator
from moejax.data.source import SOURCES
from moejax.data.tokenizers import get_tokenizer, tokenizer_vocab_size

__all__ = ["SOURCES", "ShardedBatches", "get_tokenizer", "make_iterator", "tokenizer_vocab_size"]
