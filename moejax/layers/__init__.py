"""Model layers, one file per layer family.

Shape glossary, used in array names (``x_BxTxD``) and einsum strings
(``'BTD,DHK->BTHK'``) throughout moejax:

  B batch            T query length      S key length       D model width
  H query heads      K kv heads          G query heads per kv head (H // K)
  Dh head dim        E experts           C expert capacity  F ffn width
  V vocabulary       N tokens (B*T flattened)

Logical axis names (mapped to mesh axes by ``moejax.sharding.LOGICAL_RULES``):
parameters use ``vocab, embed, heads, kv_heads, head_dim, mlp, expert, norm``;
activations use the same names prefixed ``act_`` plus ``act_batch`` and
``act_length``, so that parameter and activation layouts are set separately.
"""

import jax.numpy as jnp

from moejax import config

DTYPES = {name: getattr(jnp, name) for name in config.DTYPES}  # model.dtype / param_dtype name -> jnp type
