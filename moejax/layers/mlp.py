"""Feed-forward layers and the ``MLP`` registry (``model.mlp_types``).

Every MLP type is a Linen module constructed as ``cls(cfg=model_cfg)`` and
called as ``mlp(x_BxTxD, token_ids_BxT) -> y_BxTxD``; ``token_ids`` are the
layer's input token ids (hash routing looks experts up by them; most types
ignore them). Auxiliary losses (e.g. MoE load balance) are sown into the
``aux_loss`` collection; the trainer adds them.

Registered here: ``dense`` (SwiGLU); ``moe`` and ``hash_moe`` register
when ``moejax/layers/moe.py`` is imported (the model and the config
validation import it).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import DTYPES
from moejax.registry import Registry

# Capabilities: ``batch_dependence(model_cfg) -> list[str]``, the reasons (as config errors)
# why a layer's output for a token depends on the other tokens of the batch under this
# config, so cached decoding cannot reproduce it (default: none); ``validate_config``.
MLP = Registry("mlp type", capabilities=dict(batch_dependence=None))


def swiglu(gate, up, limit: float = 0.0):
  """``silu(gate) * up``; with ``limit > 0`` the pre-activations are clamped
  first, ``gate`` above at ``limit`` and ``up`` to ``[-limit, limit]``
  (DeepSeek-V4's ``swiglu_limit``). Any shape; elementwise."""
  if limit > 0:
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
  return nn.silu(gate) * up


@MLP.register("dense")
class SwiGLU(nn.Module):
  """SwiGLU feed-forward (Shazeer, 2020): ``(silu(x Wg) * (x Wu)) Wd``.

  x_BxTxD -> y_BxTxD with hidden width F = ``ffn_dim`` (0: ``cfg.ffn_dim``);
  ``limit`` > 0 clamps the pre-activations (see :func:`swiglu`). MoE layers
  reuse it for their shared experts (``name="shared"``).
  """

  cfg: ml_collections.FrozenConfigDict
  ffn_dim: int = 0
  limit: float = 0.0

  @nn.compact
  def __call__(self, x_BxTxD, token_ids_BxT=None):
    del token_ids_BxT
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    d, f = x_BxTxD.shape[-1], self.ffn_dim or cfg.ffn_dim
    init = nn.initializers.normal(cfg.init_std)
    w_gate_DxF = self.param("w_gate", nn.with_logical_partitioning(init, ("embed", "mlp")), (d, f), pdtype)
    w_up_DxF = self.param("w_up", nn.with_logical_partitioning(init, ("embed", "mlp")), (d, f), pdtype)
    w_down_FxD = self.param("w_down", nn.with_logical_partitioning(init, ("mlp", "embed")), (f, d), pdtype)
    x = x_BxTxD.astype(dtype)
    gate_BxTxF = jax.numpy.einsum("BTD,DF->BTF", x, w_gate_DxF.astype(dtype))
    up_BxTxF = jax.numpy.einsum("BTD,DF->BTF", x, w_up_DxF.astype(dtype))
    h_BxTxF = nn.with_logical_constraint(swiglu(gate_BxTxF, up_BxTxF, self.limit),
                                         ("act_batch", "act_length", "act_mlp"))
    return jax.numpy.einsum("BTF,FD->BTD", h_BxTxF, w_down_FxD.astype(dtype))
