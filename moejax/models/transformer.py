"""A decoder-only Transformer assembled from the per-layer schedule.

Layer i uses attention type ``attention_types[i]`` and MLP type
``mlp_types[i]``, looked up by name in the ``ATTENTION`` and ``MLP``
registries, so new variants slot in without touching this file.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.config import expand_schedule
from moejax.layers import DTYPES
from moejax.layers.attention import ATTENTION
from moejax.layers import moe as _moe  # noqa: F401  (registers the moe / hash_moe MLP types)
from moejax.layers.mlp import MLP
from moejax.layers.norms import RMSNorm

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_ACT = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
  """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

  x_BxTxD -> x_BxTxD.
  """

  cfg: ml_collections.FrozenConfigDict
  attention_type: str
  mlp_type: str

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, token_ids_BxT):
    cfg = self.cfg
    norm = lambda name: RMSNorm(cfg.norm_eps, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype], name=name)
    attn = ATTENTION.get(self.attention_type)(cfg=cfg, name="attention")
    mlp = MLP.get(self.mlp_type)(cfg=cfg, name="mlp")
    x_BxTxD = x_BxTxD + attn(norm("attention_norm")(x_BxTxD), positions_BxT, segment_ids_BxT)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, _ACT)
    x_BxTxD = x_BxTxD + mlp(norm("mlp_norm")(x_BxTxD), token_ids_BxT)
    return nn.with_logical_constraint(x_BxTxD, _ACT)


class Transformer(nn.Module):
  """Token ids -> next-token logits.

  inputs_BxT int -> logits_BxTxV float32. ``positions`` (for RoPE) default to
  ``0..T-1``; ``segment_ids`` (packed documents, 0 = padding) default to one
  document per row. With ``return_hidden=True`` it returns ``(x_BxTxD,
  head_DxV)`` instead — the final normed hidden states and the output matrix
  — so losses can form logits chunk by chunk and never hold ``[B, T, V]``
  (see ``moejax/losses.py``).
  """

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, inputs_BxT, positions_BxT=None, segment_ids_BxT=None, return_hidden: bool = False):
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(inputs_BxT.shape[1]), inputs_BxT.shape)
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones_like(inputs_BxT)

    embed_VxD = self.param(
        "embed", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), pdtype)
    x_BxTxD = nn.with_logical_constraint(jnp.take(embed_VxD, inputs_BxT, axis=0).astype(dtype), _ACT)

    block_cls = Block
    if cfg.remat != "none":
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=True)
    schedule = zip(expand_schedule(cfg.attention_types, cfg.num_layers),
                   expand_schedule(cfg.mlp_types, cfg.num_layers))
    for i, (attention_type, mlp_type) in enumerate(schedule):
      x_BxTxD = block_cls(cfg, attention_type, mlp_type, name=f"layer_{i}")(
          x_BxTxD, positions_BxT, segment_ids_BxT, inputs_BxT)

    x_BxTxD = RMSNorm(cfg.norm_eps, dtype, pdtype, name="final_norm")(x_BxTxD)
    if cfg.tie_embeddings:
      head_DxV = embed_VxD.T
    else:
      head_DxV = self.param(
          "lm_head", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
          (cfg.d_model, cfg.vocab_size), pdtype)
    if return_hidden:
      return x_BxTxD, head_DxV.astype(dtype)
    logits_BxTxV = jnp.einsum("BTD,DV->BTV", x_BxTxD, head_DxV.astype(dtype))
    return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32), ("act_batch", "act_length", "act_vocab"))


def build_model(model_cfg: ml_collections.ConfigDict) -> Transformer:
  """The model for ``config.model`` (frozen, so the module is hashable)."""
  return Transformer(ml_collections.FrozenConfigDict(model_cfg))
