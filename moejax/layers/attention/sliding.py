"""Causal sliding-window attention (Beltagy et al., 2020; Mistral, Gemma 2/3).

Dense GQA attention (same parameters and options as ``dense``) in which
query t sees only keys ``t - window < s <= t`` (``model.attention.window``;
HF's ``sliding_window`` rule). The chunked kernel skips key blocks outside
the window, so time and memory are O(T * (window + chunk_size)); mix with
``dense`` layers through the schedule, e.g. 5 sliding : 1 dense.
"""

from moejax.layers.attention.dense import DenseAttention
from moejax.layers.attention.registry import ATTENTION


@ATTENTION.register("sliding")
class SlidingAttention(DenseAttention):
  """x_BxTxD -> y_BxTxD; ``dense`` restricted to the last ``attention.window`` keys."""

  def window(self) -> int:
    return self.cfg.attention.window
