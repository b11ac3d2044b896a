"""A decoder-only Transformer assembled from the per-layer schedule.

Layer i uses attention type ``attention_types[i]`` and MLP type
``mlp_types[i]``, looked up by name in the ``ATTENTION`` and ``MLP``
registries, so new variants slot in without touching this file. The residual
(plain or hyper-connections, ``model.hc``) and the multi-token-prediction
modules (``model.mtp``) are config choices that work with every type.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import DTYPES
from moejax.layers.hyper import collapse_streams, expand_streams
from moejax.layers.norms import RMSNorm
from moejax.models.block import ACT, Block, block_class
from moejax.models.mtp import MTPModule, shift_left
from moejax.models.scan import layer_kinds, plan_of, scanned_blocks


class Hidden(NamedTuple):
  """What ``Transformer(..., return_hidden=True)`` returns."""

  x_BxTxD: jax.Array          # final normed hidden states of the main model
  head_DxV: jax.Array         # the output matrix (shared by the MTP modules)
  mtp: tuple[jax.Array, ...]  # per MTP depth k = 1..model.mtp.depth: h^k_BxTxD, normed; () when off


class Transformer(nn.Module):
  """Token ids -> next-token logits.

  inputs_BxT int -> logits_BxTxV float32. ``positions`` (for RoPE) default to
  ``0..T-1``; ``segment_ids`` (packed documents, 0 = padding) default to one
  document per row. With ``return_hidden=True`` it returns a :class:`Hidden`
  instead — the final normed hidden states, the output matrix and the
  multi-token-prediction hidden states — so losses can form logits chunk by
  chunk and never hold ``[B, T, V]`` (see ``moejax/losses.py``). The MTP
  modules run only then (and at init); plain calls give the main logits.

  Decoding (``moejax/generate.py``): ``decode_len = L > 0`` runs the T tokens
  against per-layer caches for L positions in the ``cache`` collection
  (``mutable=["cache"]``); ``positions`` must continue each row's cache and
  ``segment_ids`` mark the real tokens (1), padding (0) last in a row. The
  MTP modules are not run (no speculative decoding).
  """

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None, return_hidden: bool = False,
               decode_len: int = 0):
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(inputs_BxT.shape[1]), inputs_BxT.shape)
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(inputs_BxT)

    embed_VxD = self.param(
        "embed", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), pdtype)
    x_BxTxD = nn.with_logical_constraint(jnp.take(embed_VxD, inputs_BxT, axis=0).astype(dtype), ACT)

    h = expand_streams(x_BxTxD, cfg.hc.streams)
    plan = plan_of(cfg)  # model.scan_layers: the repeated layers run as one nn.scan (moejax/models/scan.py)
    for i, (attention_type, mlp_type, remat) in enumerate(layer_kinds(cfg)):
      if plan and plan.prefix <= i < plan.scanned_end:
        if i == plan.prefix:
          h, _ = scanned_blocks(cfg, plan, decode_len)(h, positions_BxT, segment_ids_BxT, inputs_BxT)
        continue
      block = Block if decode_len else block_class(remat)  # decoding: no remat (no backward pass)
      h = block(cfg, attention_type, mlp_type, name=f"layer_{i}")(
          h, positions_BxT, segment_ids_BxT, inputs_BxT, decode_len)  # static under remat (block_class)
    x_BxTxD = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(collapse_streams(cfg, h))

    if cfg.tie_embeddings:
      head_DxV = embed_VxD.T
    else:
      head_DxV = self.param(
          "lm_head", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), pdtype)

    if decode_len and return_hidden:  # decoding: no MTP modules
      return Hidden(x_BxTxD, head_DxV.astype(dtype), ())
    if (return_hidden or self.is_initializing()) and not decode_len:
      mtp_hidden, h_BxTxD = [], x_BxTxD
      for k in range(1, cfg.mtp.depth + 1):
        h_BxTxD = MTPModule(cfg, name=f"mtp_{k}")(
            h_BxTxD, shift_left(inputs_BxT, k), embed_VxD, positions_BxT, segment_ids_BxT)
        mtp_hidden.append(h_BxTxD)
      if return_hidden:
        return Hidden(x_BxTxD, head_DxV.astype(dtype), tuple(mtp_hidden))
    logits_BxTxV = jnp.einsum("BTD,DV->BTV", x_BxTxD, head_DxV.astype(dtype))
    return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))


def build_model(model_cfg: ml_collections.ConfigDict) -> Transformer:
  """The model for ``config.model`` (frozen, so the module is hashable)."""
  return Transformer(ml_collections.FrozenConfigDict(model_cfg))
