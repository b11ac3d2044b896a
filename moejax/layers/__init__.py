"""Model layers, one file per layer family.

Shape glossary, used in array names (``x_BxTxD``, ``q_BxTxHxDh``) and einsum
strings (``'BTD,DHd->BTHd'``) throughout moejax; the full table, one meaning
per letter, is in ``docs/architecture.md``:

  B batch            T query positions   S key positions    C chunk of positions
  D model width      F ffn width         V vocabulary       Q query block
  H query heads      K kv heads          G query heads per kv head (H // K)
  E experts          A experts per token
  N tokens (B*T)     M grouped rows      L MTP depth        Z compressed entries
  R latent rank      J indexer heads     I indexer head dim P prompt length
  Dh q/k head dim, Dv value head dim, Dn/Dr its no-rope/rope parts, Dk latent
  keys (R + Dr); einsum strings write these d, v, n, k.

Logical axis names (mapped to mesh axes by ``moejax.sharding.LOGICAL_RULES``):
parameters use ``vocab, embed, heads, kv_heads, head_dim, mlp, expert, norm``;
activations use the same names prefixed ``act_`` plus ``act_batch`` and
``act_length``, so that parameter and activation layouts are set separately.
"""

import jax.numpy as jnp

from moejax import config

DTYPES = {name: getattr(jnp, name) for name in config.DTYPES}  # model.dtype / param_dtype name -> jnp type
