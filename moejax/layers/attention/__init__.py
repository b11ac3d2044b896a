"""Attention types and the ``ATTENTION`` registry (``registry.py``; ``model.attention_types``).

Every attention type is a Linen module constructed as ``cls(cfg=model_cfg)``
and called as ``attn(x_BxTxD, positions_BxT, segment_ids_BxT) -> y_BxTxD``.
``segment_ids`` separate packed documents (0 = padding); attention never
crosses a document boundary and is causal within a document. For
generation every type also has ``attn.decode(x_BxCxD, positions_BxC,
segment_ids_BxC, max_len)``: a chunk of new tokens against its own cache in
the ``cache`` collection (``cache.py``, docs/generation.md). Options live
in ``model.attention`` (see docs/attention.md):

  dense     GQA over all previous keys              (dense.py)
  sliding   GQA over the last ``window`` keys       (sliding.py)
  mla       DeepSeek-V2/V3 multi-head latent attn   (mla.py)
  dsa       DeepSeek-V3.2 sparse attention (MLA + lightning indexer top-k)  (dsa.py)
  swa/csa/hca  DeepSeek-V4 shared-KV attention: window only / + compressed
            entries picked by an indexer / + all heavily compressed entries  (compressed.py)
"""

from moejax.layers.attention.registry import ATTENTION

# Importing a module registers the types it defines.
from moejax.layers.attention import compressed, dense, dsa, mla, sliding  # noqa: F401

__all__ = ["ATTENTION"]
