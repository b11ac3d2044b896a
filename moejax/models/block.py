"""One decoder block: attention then MLP, each inside the model's residual.

The residual is ``model.hc.streams``: 1 is the plain pre-norm residual, N > 1
the manifold-constrained hyper-connections of ``moejax/layers/hyper.py``. Both
wrap whichever attention / MLP types the schedule names.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from moejax.layers import DTYPES
from moejax.layers import moe as _moe  # noqa: F401  (registers the moe / hash_moe MLP types)
from moejax.layers.attention import ATTENTION
from moejax.layers.hyper import HyperConnection, mix_streams
from moejax.layers.mlp import MLP
from moejax.layers.norms import RMSNorm

# ``model.remat`` (one name of config.REMAT_POLICIES, or one per layer; "none"
# is no remat) -> its jax.checkpoint policy. Every policy keeps the block's
# input (the argument of the rematerialised function); "full" keeps nothing
# else, "dots*" keep matmul outputs, "offload_dots" moves the batch-free matmul
# outputs to host memory ("pinned_host") and back for the backward pass.
CHECKPOINT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}

ACT = ("act_batch", "act_length", "act_embed")


def remat_compiler_options(platform: str) -> dict[str, str]:
  """XLA options under which ``jax.checkpoint`` actually rematerialises on ``platform``.

  JAX keeps a remat block's recomputation apart from the forward pass with an
  ``optimization_barrier``; XLA:CPU expands (drops) those barriers early in its
  pipeline, before common-subexpression elimination, which then merges the
  recomputation back into the forward pass: every block's activations stay
  alive until its backward pass and ``model.remat`` saves nothing. Keeping the
  barriers (skipping that one pass) restores remat on CPU, with bit-identical
  results (tests/models/test_transformer.py). GPU and TPU keep the barriers already.
  """
  return {"xla_disable_hlo_passes": "cse_barrier_expander"} if platform == "cpu" else {}


class Block(nn.Module):
  """Attention then MLP, each a residual branch ``f`` around a pre-norm.

  Plain (``model.hc.streams == 1``): x_BxTxD -> x_BxTxD, ``x + f(norm(x))``.
  mHC (N streams): h_BxTxNxD -> h_BxTxNxD, ``post * f(norm(sum_n pre_n h_n)) +
  comb^T h`` (DeepSeek-V4's decoder layer; see ``moejax/layers/hyper.py``).
  ``decode_len > 0``: T new tokens against the attention's decode cache of
  ``decode_len`` positions (``attn.decode``, ``moejax/layers/attention/cache.py``).
  """

  cfg: ml_collections.FrozenConfigDict
  attention_type: str
  mlp_type: str

  @nn.compact
  def __call__(self, h, positions_BxT, segment_ids_BxT, token_ids_BxT, decode_len: int = 0):
    cfg = self.cfg
    attn = ATTENTION.get(self.attention_type)(cfg=cfg, name="attention")
    mlp = MLP.get(self.mlp_type)(cfg=cfg, name="mlp")

    def residual(name, sublayer, h):
      norm = RMSNorm(cfg.norm_eps, DTYPES[cfg.dtype], DTYPES[cfg.param_dtype], name=f"{name}_norm")
      if cfg.hc.streams == 1:
        return nn.with_logical_constraint(h + sublayer(norm(h)), ACT)
      post, comb, x_BxTxD = HyperConnection(cfg, name=f"{name}_hc")(h)
      return mix_streams(h, sublayer(norm(x_BxTxD)), post, comb)

    if decode_len:  # a chunk of new tokens against the attention's cache (``cache.py``)
      attend = lambda x: attn.decode(x, positions_BxT, segment_ids_BxT, decode_len)
    else:
      attend = lambda x: attn(x, positions_BxT, segment_ids_BxT)
    h = residual("attention", attend, h)
    return residual("mlp", lambda x: mlp(x, token_ids_BxT), h)


def block_class(remat: str) -> type[nn.Module]:
  """``Block``, rematerialized under the policy ``remat`` (a ``model.remat`` entry) unless "none"."""
  if remat == "none":
    return Block
  # decode_len (argument 5, self being 0) is a Python int: static under remat.
  return nn.remat(Block, policy=CHECKPOINT_POLICIES[remat], prevent_cse=True, static_argnums=(5,))
