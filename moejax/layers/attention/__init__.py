"""Attention types and the ``ATTENTION`` registry (``model.attention_types``).

Every attention type is a Linen module constructed as ``cls(cfg=model_cfg)``
and called as ``attn(x_BxTxD, positions_BxT, segment_ids_BxT) -> y_BxTxD``.
``segment_ids`` separate packed documents (0 = padding); attention never
crosses a document boundary and is causal within a document.
"""

from moejax.registry import Registry

ATTENTION = Registry("attention type")

# Importing a module registers the types it defines.
from moejax.layers.attention import dense  # noqa: E402,F401
