"""Sparse mixture-of-experts feed-forward layers: MLP types ``moe`` and ``hash_moe``.

``y = sum_k w_k SwiGLU_{e_k}(x) + SwiGLU_shared(x)`` (DeepSeekMoE, Dai et al.
2024): fine-grained routed experts chosen per token by a router
(``moejax/layers/routers.py``), plus ``num_shared`` always-on shared experts
as one SwiGLU of width ``num_shared * expert_ffn_dim`` (DeepSeek-V3's
layout). ``hash_moe`` is the same layer with the ``hash`` router (DeepSeek-V4's
first layers). Select per layer with ``model.mlp_types``, e.g. the first
layer dense: ``("dense", "moe", "moe", "moe")``. Settings: ``model.moe``.

Parameters (names other code relies on):
``w_gate [E, D, F]``, ``w_up [E, D, F]`` (logical axes ``expert, embed, mlp``),
``w_down [E, F, D]`` (``expert, mlp, embed``), ``router/w_gate [D, E]``,
``shared/{w_gate, w_up, w_down}``. Non-trainable state: ``router_bias``
(aux-loss-free bias, updated after each step) and ``hash_table`` (frozen).

Sown: ``aux_loss`` (the weighted balance losses and z-loss) and ``metrics``:
``expert_load [E]`` (assignments per expert / mean; 1 = balanced),
``load_max_over_mean``, ``load_min_over_mean``, ``dropped_fraction``,
``router_entropy`` (nats), the raw (unweighted) ``load_balance_loss``,
``seq_balance_loss``, ``z_loss``, and each times its config weight as
``<name>_weighted``: what entered the objective (their sum is the layer's ``aux_loss``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.config import DISPATCH_MODES, SCORES
from moejax.layers import DTYPES
from moejax.layers.mlp import MLP, SwiGLU
from moejax.layers.moe_dispatch import (BACKENDS, DispatchSpec, ExpertWeights, dispatch, resolve_backend,
                                        unavailable_because)
from moejax.layers.routers import ROUTERS, RouterAux, replayable
from moejax.layers.balancing import validate_balancing
from moejax.sharding import expert_axes

EXPERT_LOAD_METRIC = "expert_load"  # the trainer's expert-collapse warning reads it


def expert_counts(expert_BxTxA, num_experts: int) -> jax.Array:
  """float32 [B, E]: assignments per sequence and expert (empty slots, id E, not counted)."""
  return jnp.sum(jax.nn.one_hot(expert_BxTxA, num_experts, dtype=jnp.float32), axis=(1, 2))


def balance_loss(counts_GxE, probs_GxE) -> jax.Array:
  """``E * sum_e f_e P_e`` averaged over groups G, with ``f`` the share of the
  group's assignments and ``P`` the mean router probability of each expert;
  1 when uniform. One group = the Switch load-balance loss (Fedus et al.,
  2021); one group per sequence = DeepSeek-V3's sequence-wise balance loss."""
  e = counts_GxE.shape[-1]
  f_GxE = counts_GxE / jnp.maximum(jnp.sum(counts_GxE, -1, keepdims=True), 1.0)
  return e * jnp.mean(jnp.sum(f_GxE * probs_GxE, -1))


def router_z_loss(logits_NxE) -> jax.Array:
  """ST-MoE z-loss (Zoph et al., 2022): ``mean_n logsumexp(logits_n)^2``."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_NxE, axis=-1)))


@MLP.register("moe")
class MoE(nn.Module):
  """Routed + shared experts. x_BxTxD, token_ids_BxT -> y_BxTxD.

  ``router`` overrides ``cfg.moe.router`` (``hash_moe`` sets ``"hash"``).
  """

  cfg: ml_collections.FrozenConfigDict
  router: str = ""

  @staticmethod
  def validate_config(cfg) -> list[str]:
    return validate_moe(cfg)

  @classmethod
  def batch_dependence(cls, model_cfg) -> list[str]:
    """Expert-choice-like routers and capacity dispatch depend on the other tokens of the batch."""
    moe, router = model_cfg.moe, cls.router or model_cfg.moe.router
    reasons = []
    if router in ROUTERS and ROUTERS.capability(router, "batch_dependent"):
      reasons.append(f"model.moe.router={router!r} routes over the whole batch, so a token's experts change with "
                     "what else is decoded; generate with a token-choice router (e.g. topk).")
    if moe.dispatch == "capacity":
      reasons.append(f"model.moe.dispatch={moe.dispatch!r} drops tokens depending on the batch; generate "
                     "with --config.model.moe.dispatch=dropless (same weights).")
    return reasons

  @nn.compact
  def __call__(self, x_BxTxD, token_ids_BxT=None):
    cfg, moe = self.cfg, self.cfg.moe
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    b, t, d = x_BxTxD.shape
    e, f = moe.num_experts, moe.expert_ffn_dim
    if token_ids_BxT is None:
      token_ids_BxT = jnp.zeros((b, t), jnp.int32)

    router = replayable(ROUTERS.get(self.router or moe.router))(cfg=cfg, name="router")
    expert_NxA, weight_NxA, aux = router(x_BxTxD.reshape(b * t, d), token_ids_BxT.reshape(b * t))
    expert_BxTxA = expert_NxA.reshape(b, t, -1)

    init = nn.initializers.normal(cfg.init_std)
    param = lambda name, shape, axes: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, pdtype).astype(dtype)
    weights = ExpertWeights(param("w_gate", (e, d, f), ("expert", "embed", "mlp")),
                            param("w_up", (e, d, f), ("expert", "embed", "mlp")),
                            param("w_down", (e, f, d), ("expert", "mlp", "embed")))
    mesh = jax.sharding.get_abstract_mesh()
    expert_parallel = not mesh.empty and bool(expert_axes(mesh.shape, e))
    spec = DispatchSpec(num_experts=e, top_k=moe.top_k, dropless=moe.dispatch == "dropless",
                        capacity_factor=moe.capacity_factor,
                        backend=resolve_backend(moe.backend, moe.dispatch == "dropless", expert_parallel),
                        swiglu_limit=moe.swiglu_limit)
    y_BxTxD, dropped = dispatch(x_BxTxD.astype(dtype), expert_BxTxA, weight_NxA.reshape(b, t, -1), weights, spec)
    if moe.num_shared:
      y_BxTxD = y_BxTxD + SwiGLU(cfg, ffn_dim=moe.num_shared * f, limit=moe.swiglu_limit, name="shared")(x_BxTxD)
    if not self.is_initializing():  # init keeps parameters and state only
      self._losses_and_metrics(expert_BxTxA, aux, dropped)
    return nn.with_logical_constraint(y_BxTxD.astype(dtype), ("act_batch", "act_length", "act_embed"))

  def _losses_and_metrics(self, expert_BxTxA, aux: RouterAux, dropped) -> None:
    moe = self.cfg.moe
    b, t, _ = expert_BxTxA.shape
    counts_BxE = expert_counts(expert_BxTxA, moe.num_experts)
    probs_BxTxE = aux.probs_NxE.reshape(b, t, -1)
    counts_E, probs_E = jnp.sum(counts_BxE, 0), jnp.mean(probs_BxTxE, (0, 1))
    losses = {
        "load_balance_loss": (moe.load_balance_weight, balance_loss(counts_E[None], probs_E[None])),
        "seq_balance_loss": (moe.seq_balance_weight, balance_loss(counts_BxE, jnp.mean(probs_BxTxE, 1))),
        "z_loss": (moe.z_loss_weight, router_z_loss(aux.logits_NxE)),
    }
    weighted = [weight * value for weight, value in losses.values() if weight > 0]
    if weighted:
      self.sow("aux_loss", "moe", sum(weighted))

    mean_load = jnp.maximum(jnp.mean(counts_E), 1e-9)
    p = aux.probs_NxE
    metrics = {
        EXPERT_LOAD_METRIC: counts_E / mean_load,
        "load_max_over_mean": jnp.max(counts_E) / mean_load,
        "load_min_over_mean": jnp.min(counts_E) / mean_load,
        "dropped_fraction": dropped / jnp.maximum(jnp.sum(counts_E), 1.0),
        "router_entropy": -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), -1)),
        **{name: value for name, (_, value) in losses.items()},
        **{f"{name}_weighted": weight * value for name, (weight, value) in losses.items()},
    }
    for name, value in metrics.items():
      self.sow("metrics", name, jax.lax.stop_gradient(value))


@MLP.register("hash_moe")
class HashMoE(MoE):
  """:class:`MoE` with the frozen token-id -> experts ``hash`` router (DeepSeek-V4)."""

  router: str = "hash"


def validate_moe(cfg: ml_collections.ConfigDict) -> list[str]:
  """Errors of ``model.moe`` (and its mesh constraints) when a layer is an MoE type."""
  e: list[str] = []
  need = lambda ok, msg: ok or e.append(msg)
  validate_balancing(cfg.model.moe, e)
  moe, mesh = cfg.model.moe, cfg.mesh
  for field in ("num_experts", "top_k", "expert_ffn_dim", "num_groups", "topk_groups"):
    need(moe[field] >= 1, f"model.moe.{field}={moe[field]} must be >= 1.")
  need(moe.num_shared >= 0, f"model.moe.num_shared={moe.num_shared} must be >= 0.")
  need(moe.top_k <= moe.num_experts,
       f"model.moe.top_k={moe.top_k} exceeds model.moe.num_experts={moe.num_experts}; lower top_k or add experts.")
  need(moe.score in SCORES, f"model.moe.score={moe.score!r} is not one of {SCORES}.")
  need(moe.dispatch in DISPATCH_MODES, f"model.moe.dispatch={moe.dispatch!r} is not one of {DISPATCH_MODES}.")
  need(moe.capacity_factor > 0, f"model.moe.capacity_factor={moe.capacity_factor} must be > 0.")
  need(moe.routed_scale > 0, f"model.moe.routed_scale={moe.routed_scale} must be > 0.")
  need(moe.swiglu_limit >= 0, f"model.moe.swiglu_limit={moe.swiglu_limit} must be >= 0 (0 disables).")
  need(moe.collapse_steps >= 0, f"model.moe.collapse_steps={moe.collapse_steps} must be >= 0 (0 disables).")
  need(moe.bias_update_rate >= 0, f"model.moe.bias_update_rate={moe.bias_update_rate} must be >= 0.")
  for field in ("load_balance_weight", "seq_balance_weight", "z_loss_weight"):
    need(moe[field] >= 0, f"model.moe.{field}={moe[field]} must be >= 0 (0 disables).")

  need(moe.router in ROUTERS, f"model.moe.router={moe.router!r} is unknown; known: {', '.join(ROUTERS.names())} "
       "(register yours with @ROUTERS.register and import it from your config file).")
  if moe.router in ROUTERS:
    need(not moe.score_bias or ROUTERS.capability(moe.router, "supports_bias"),
         f"model.moe.score_bias=True but router {moe.router!r} has no selection bias; use router='topk' "
         "or set score_bias=False.")
    need(moe.num_groups == 1 or ROUTERS.capability(moe.router, "supports_groups"),
         f"model.moe.num_groups={moe.num_groups} but router {moe.router!r} does not limit groups; use "
         "router='topk' or num_groups=1.")
  if moe.num_groups >= 1 and moe.num_experts % moe.num_groups == 0 and moe.num_groups > 1:
    need(moe.topk_groups <= moe.num_groups,
         f"model.moe.topk_groups={moe.topk_groups} exceeds model.moe.num_groups={moe.num_groups}.")
  elif moe.num_groups > 1:
    e.append(f"model.moe.num_groups={moe.num_groups} does not divide model.moe.num_experts={moe.num_experts}; "
             "pick a divisor.")

  if moe.backend != "auto" and moe.backend not in BACKENDS:
    e.append(f"model.moe.backend={moe.backend!r} is unknown; known: auto, {', '.join(BACKENDS.names())}.")
  elif moe.backend != "auto" and moe.dispatch in DISPATCH_MODES:
    backend = BACKENDS.get(moe.backend)
    need(getattr(backend, moe.dispatch),
         f"model.moe.backend={moe.backend!r} does not support dispatch={moe.dispatch!r}; use backend='einsum' "
         "(supports both) or 'auto'.")
    why = unavailable_because(moe.backend)
    need(why is None, f"model.moe.backend={moe.backend!r} cannot run here: {why}; use backend='auto' "
         "(or 'ragged_dot' / 'einsum').")
    need(mesh.expert == 1 or backend.expert_parallel,
         f"model.moe.backend={moe.backend!r} does not support expert parallelism (mesh.expert={mesh.expert}); "
         "use backend='einsum' or 'auto'.")
  if mesh.expert != -1 and mesh.expert > 1:
    need(moe.num_experts % mesh.expert == 0,
         f"mesh.expert={mesh.expert} does not divide model.moe.num_experts={moe.num_experts}; experts are split "
         "evenly over the expert axis.")
  return e
