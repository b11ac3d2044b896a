"""MoE routers: which experts each token goes to, with what weight (``ROUTERS``).

A router is a small Linen module constructed as ``cls(cfg=model_cfg,
name="router")`` and called on the flattened tokens of one MoE layer::

    expert_NxA, weight_NxA, aux = router(x_NxD, token_ids_N)

``expert_NxA`` are int32 expert ids (E marks an empty slot), ``weight_NxA``
float32 combine weights, ``aux`` a :class:`RouterAux` with the gate logits and
a per-token distribution over experts (for the balance losses, z-loss and
entropy). Select one with ``model.moe.router``; write your own in a few lines
(README, "Write your own router")::

    @ROUTERS.register("my_router")
    class MyRouter(nn.Module):
      cfg: object
      @nn.compact
      def __call__(self, x_NxD, token_ids_N):
        logits_NxE = gate_logits(self, x_NxD)
        ...

Routers here:

* ``topk`` — token choice: scores ``softmax | sigmoid | sqrtsoftplus`` of the
  logits, optional group-limited selection (DeepSeek-V3: keep the
  ``topk_groups`` groups whose two best biased scores sum highest), optional
  auxiliary-loss-free bias added for selection only (DeepSeek-V3, Wang et al.
  2024), weights taken from the unbiased scores, optionally renormalised over
  the top k, times ``routed_scale``. Covers DeepSeek-V3/V4, Qwen3-MoE and
  Mixtral (softmax + renormalise == softmax over the top-k logits).
* ``hash`` — DeepSeek-V4's first layers: experts from a frozen token-id ->
  experts table (collection ``hash_table``), weights from the learned gate.
* ``expert_choice`` — each expert takes its top-C tokens of the batch (Zhou et
  al. 2022). Its choices depend on other tokens of the batch, including later
  ones, so it leaks future information in a causal LM: for research only.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from moejax.layers.moe_dispatch import capacity
from moejax.layers.state import STATE_UPDATES
from moejax.registry import Registry
from moejax.layers.balancing import bias_update_rate

# Capabilities (class attributes): supports_bias (model.moe.score_bias), supports_groups
# (model.moe.num_groups > 1), batch_dependent (a token's experts depend on the other tokens of
# the batch, so cached decoding cannot reproduce the forward pass).
ROUTERS = Registry("router", capabilities=dict(supports_bias=False, supports_groups=False, batch_dependent=False))

# ``model.moe`` settings of published routers, by name (configs/tiny_moe.py:<name>,
# configs/v4_tiny.py): ``c.model.moe.update(ROUTER_RECIPES["v4"])``.
ROUTER_RECIPES = {
    "v3": dict(score="sigmoid", score_bias=True, num_groups=4, topk_groups=2, renormalize=True),
    "v4": dict(score="sqrtsoftplus", score_bias=True, renormalize=True, routed_scale=1.5, swiglu_limit=10.0),
    "qwen3": dict(score="softmax", renormalize=True, num_shared=0, load_balance_weight=0.01),
    "mixtral": dict(score="softmax", renormalize=True, num_shared=0),
    "expert_choice": dict(router="expert_choice", score="softmax", capacity_factor=1.0),
    "no_bias": dict(score="sigmoid", score_bias=False, num_groups=4, topk_groups=2, renormalize=True),
}
BIAS_COLLECTION = "router_bias"
HASH_COLLECTION = "hash_table"
REPLAY_COLLECTION = "routing_replay"  # recorded experts to route by (moejax/lab/replay.py)


class RouterAux(NamedTuple):
  """What the losses and metrics need from a router (float32)."""

  logits_NxE: jax.Array  # gate logits (router z-loss)
  probs_NxE: jax.Array   # per-token distribution over experts (balance losses, entropy)


SCORE_FUNCTIONS = {  # model.moe.score (one of config.SCORES) -> scores_NxE from logits_NxE
    "softmax": lambda logits: jax.nn.softmax(logits, axis=-1),
    "sigmoid": jax.nn.sigmoid,
    "sqrtsoftplus": lambda logits: jnp.sqrt(jax.nn.softplus(logits)),  # DeepSeek-V4
}


def gate_logits(module: nn.Module, x_NxD) -> jax.Array:
  """``x W`` in float32 with the gate ``w_gate [D, E]`` (logical axes ``("embed", None)``)."""
  cfg = module.cfg
  w_DxE = module.param("w_gate", nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("embed", None)),
                       (x_NxD.shape[-1], cfg.moe.num_experts), jnp.float32)
  return jnp.einsum("ND,DE->NE", x_NxD.astype(jnp.float32), w_DxE.astype(jnp.float32))


def probs_from_scores(scores_NxE, score: str) -> jax.Array:
  """Softmax scores as they are; other scores normalised per token (DeepSeek-V3's s')."""
  return scores_NxE if score == "softmax" else scores_NxE / (jnp.sum(scores_NxE, -1, keepdims=True) + 1e-20)


def combine_weights(scores_NxE, expert_NxA, moe: ml_collections.ConfigDict) -> jax.Array:
  """Scores of the chosen experts (0 for empty slots), renormalised if asked, times ``routed_scale``."""
  e = scores_NxE.shape[-1]
  w_NxA = jnp.where(expert_NxA < e, jnp.take_along_axis(scores_NxE, jnp.minimum(expert_NxA, e - 1), -1), 0.0)
  if moe.renormalize:
    w_NxA = w_NxA / (jnp.sum(w_NxA, -1, keepdims=True) + 1e-20)
  return w_NxA * moe.routed_scale


def selection_bias(module: nn.Module, num_experts: int) -> jax.Array:
  """The auxiliary-loss-free balancing bias ``[E]`` (collection ``router_bias``),
  plus the per-expert load sown into ``stats`` for its update after each step."""
  return module.variable(BIAS_COLLECTION, "bias", lambda: jnp.zeros((num_experts,), jnp.float32)).value


def sow_load(module: nn.Module, expert_NxA, num_experts: int) -> None:
  """Sows assignments per expert ``[E]`` into ``stats`` (summed over calls and micro-batches), and
  ``balance_sign [E]`` = ``sign(mean(load) - load)`` of this call alone and ``balance_calls`` = 1 (their sums
  over micro-batches give the mean sign of ``balance_stats="micro"``)."""
  load_E = jnp.sum(jax.nn.one_hot(expert_NxA, num_experts, dtype=jnp.float32), axis=(0, 1))
  zeros = lambda: jnp.zeros((num_experts,), jnp.float32)
  module.sow("stats", "load", load_E, init_fn=zeros, reduce_fn=lambda a, b: a + b)
  module.sow("stats", "balance_sign", jnp.sign(jnp.mean(load_E) - load_E), init_fn=zeros,
             reduce_fn=lambda a, b: a + b)
  module.sow("stats", "balance_calls", jnp.ones((), jnp.float32), init_fn=lambda: jnp.zeros((), jnp.float32),
             reduce_fn=lambda a, b: a + b)


def group_limited(sel_NxE, num_groups: int, topk_groups: int) -> jax.Array:
  """Ranks every expert outside the ``topk_groups`` best of ``num_groups`` groups
  below every expert inside them; a group's score is the sum of its two best
  selection scores (DeepSeek-V3). A top-k larger than the kept groups' experts
  is filled with the best of the others (transformers masks them to -inf, and
  its top-k takes them in tie order; for top_k == num_experts both take all)."""
  n, e = sel_NxE.shape
  grouped_NxGxS = sel_NxE.reshape(n, num_groups, e // num_groups)
  group_NxG = jnp.sum(jax.lax.top_k(grouped_NxGxS, min(2, e // num_groups))[0], -1)
  keep_NxG = jnp.sum(jax.nn.one_hot(jax.lax.top_k(group_NxG, topk_groups)[1], num_groups, dtype=jnp.int32), 1) > 0
  # Shift the others below the kept minimum; their order among themselves is unchanged.
  span_Nx1 = jnp.max(sel_NxE, -1, keepdims=True) - jnp.min(sel_NxE, -1, keepdims=True) + 1.0
  return jnp.where(jnp.repeat(keep_NxG, e // num_groups, axis=1), sel_NxE, sel_NxE - span_Nx1)


@ROUTERS.register("topk")
class TopKRouter(nn.Module):
  """Token-choice top-k (see module docstring). x_NxD -> expert_NxA, weight_NxA, aux."""

  cfg: ml_collections.FrozenConfigDict
  supports_bias: ClassVar[bool] = True
  supports_groups: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x_NxD, token_ids_N):
    del token_ids_N
    moe = self.cfg.moe
    logits_NxE = gate_logits(self, x_NxD)
    scores_NxE = SCORE_FUNCTIONS[moe.score](logits_NxE)
    sel_NxE = scores_NxE
    if moe.score_bias:
      sel_NxE = sel_NxE + selection_bias(self, moe.num_experts)
    if moe.num_groups > 1:
      sel_NxE = group_limited(sel_NxE, moe.num_groups, moe.topk_groups)
    expert_NxA = jax.lax.top_k(sel_NxE, moe.top_k)[1].astype(jnp.int32)
    if moe.score_bias:
      sow_load(self, expert_NxA, moe.num_experts)
    return (expert_NxA, combine_weights(scores_NxE, expert_NxA, moe),
            RouterAux(logits_NxE, probs_from_scores(scores_NxE, moe.score)))


def random_hash_table(rng, vocab_size: int, num_experts: int, k: int) -> jax.Array:
  """int32 [V, k]: k distinct random experts per token id."""
  return jnp.argsort(jax.random.uniform(rng, (vocab_size, num_experts)), axis=-1)[:, :k].astype(jnp.int32)


@ROUTERS.register("hash")
class HashRouter(nn.Module):
  """Hash routing (DeepSeek-V4, after Roller et al. 2021): ``experts = tid2eid[token_id]``,
  a frozen table in collection ``hash_table`` (random and deterministic from
  the init seed, or loaded from a checkpoint); the learned gate only weights
  them. x_NxD, token_ids_N -> expert_NxA, weight_NxA, aux."""

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_NxD, token_ids_N):
    cfg, moe = self.cfg, self.cfg.moe
    table = self.variable(HASH_COLLECTION, "tid2eid", lambda: random_hash_table(
        self.make_rng("params"), cfg.vocab_size, moe.num_experts, moe.top_k))
    logits_NxE = gate_logits(self, x_NxD)
    scores_NxE = SCORE_FUNCTIONS[moe.score](logits_NxE)
    expert_NxA = jnp.take(table.value, token_ids_N, axis=0)
    return (expert_NxA, combine_weights(scores_NxE, expert_NxA, moe),
            RouterAux(logits_NxE, probs_from_scores(scores_NxE, moe.score)))


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(nn.Module):
  """Expert choice (Zhou et al., 2022): expert e takes the C tokens with the
  highest scores ``s[:, e]``, C = ceil(capacity_factor * N * top_k / E); a
  token may get 0..E experts. x_NxD -> expert_NxE (slot e holds e or E =
  empty), weight_NxE, aux."""

  batch_dependent: ClassVar[bool] = True

  cfg: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_NxD, token_ids_N):
    del token_ids_N
    moe = self.cfg.moe
    n, e = x_NxD.shape[0], moe.num_experts
    logits_NxE = gate_logits(self, x_NxD)
    scores_NxE = SCORE_FUNCTIONS[moe.score](logits_NxE)
    cap = capacity(n, moe.top_k, e, moe.capacity_factor)
    token_ExC = jax.lax.top_k(scores_NxE.T, cap)[1]
    chosen_NxE = jnp.zeros((e, n), bool).at[jnp.arange(e)[:, None], token_ExC].set(True).T
    expert_NxE = jnp.where(chosen_NxE, jnp.arange(e, dtype=jnp.int32)[None], e)
    return (expert_NxE, combine_weights(scores_NxE, expert_NxE, moe),
            RouterAux(logits_NxE, probs_from_scores(scores_NxE, moe.score)))


def replayable(router_cls: type) -> type:
  """``router_cls`` that routes by recorded experts when given them (router replay, as in Megatron-LM).

  With a variable ``routing_replay/<router path>/expert_BxTxK`` (int32 [B, T, K])
  the router runs as usual (same parameters, losses and metrics) but returns
  the recorded experts, weighted by its own scores ``SCORES[moe.score](logits)``
  at those experts (so the gate still learns); without one it is ``router_cls``.
  """
  if router_cls not in _REPLAYABLE:
    method = router_cls.__call__
    own_call = getattr(method, "__wrapped__", method)  # the undecorated method: one call, one captured output

    def __call__(self, x_NxD, token_ids_N):
      expert_NxK, weight_NxK, aux = own_call(self, x_NxD, token_ids_N)
      if self.has_variable(REPLAY_COLLECTION, "expert_BxTxK"):
        expert_NxK = self.get_variable(REPLAY_COLLECTION, "expert_BxTxK").reshape(x_NxD.shape[0], -1)
        expert_NxK = expert_NxK.astype(jnp.int32)
        weight_NxK = combine_weights(SCORE_FUNCTIONS[self.cfg.moe.score](aux.logits_NxE), expert_NxK, self.cfg.moe)
      return expert_NxK, weight_NxK, aux
    if getattr(method, "compact", False):
      __call__ = nn.compact(__call__)
    _REPLAYABLE[router_cls] = type(router_cls.__name__, (router_cls,), {"__call__": __call__})
  return _REPLAYABLE[router_cls]


_REPLAYABLE: dict[type, type] = {}


def replay_variables(batch: dict) -> dict:
  """``{"routing_replay": tree}`` from batch entries ``"routing_replay/<moe layer path>"`` (int32
  [B, T, K] each; see moejax/lab/replay.py), or {} for a batch without them."""
  prefix = REPLAY_COLLECTION + "/"
  tree = {tuple(k[len(prefix):].split("/")) + ("router", "expert_BxTxK"): v
          for k, v in batch.items() if k.startswith(prefix)}
  return {REPLAY_COLLECTION: traverse_util.unflatten_dict(tree)} if tree else {}


def update_router_bias(tree, stats, model_cfg, step=0):
  """Auxiliary-loss-free balancing (DeepSeek-V3): after step ``step`` (0-based),
  every bias moves towards balance by ``b += rate(step) * sign(mean(load) - load)``
  with ``rate`` from :func:`moejax.layers.balancing.bias_update_rate` and the
  loads its router sowed at the same module path: summed over the global batch
  (``balance_stats="global"``), or the mean over micro-batches of each one's
  sign (``"micro"``)."""
  rate = bias_update_rate(model_cfg.moe, step)
  micro = model_cfg.moe.balance_stats == "micro"
  loads = traverse_util.flatten_dict(stats)
  new = {}
  for path, bias_E in traverse_util.flatten_dict(tree).items():
    load_E, signs_E = loads.get(path[:-1] + ("load",)), loads.get(path[:-1] + ("balance_sign",))
    if load_E is None:
      new[path] = bias_E
    elif micro and signs_E is not None:
      new[path] = bias_E + rate * signs_E / jnp.maximum(loads[path[:-1] + ("balance_calls",)], 1.0)
    else:
      new[path] = bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)
  return traverse_util.unflatten_dict(new)


STATE_UPDATES.register(BIAS_COLLECTION)(update_router_bias)
