"""MoE dispatch: tokens to their experts, the expert SwiGLUs, and back.

One interface, two modes, several backends (``model.moe.dispatch`` and
``model.moe.backend``)::

    y_NxD, dropped = dispatch(x_NxD, experts_AxN, weights_AxN, ExpertWeights(...), spec)

with ``y[n] = sum_k weights[k, n] * SwiGLU_{experts[k, n]}(x[n])``. An expert
id equal to E marks an empty slot (expert-choice routing uses them).

* ``dropless`` (default) never drops a token.
* ``capacity`` gives every expert C = ceil(capacity_factor * N * top_k / E)
  slots (the GShard/Switch recipe); assignments past C are dropped, first
  choices before second choices, earlier tokens first, and ``dropped`` counts
  them.

Backends (``BACKENDS``; ``auto`` picks per platform, see ``resolve_backend``):

* ``einsum``: sort assignments by expert, gather them into a padded
  ``[E, C, D]`` buffer, one batched einsum per projection, gather back. In
  capacity mode C is fixed; dropless picks C at run time from a ladder of
  static capacities (``lax.switch``) as the smallest one that holds the most
  loaded expert, so no token is dropped and padding stays small when the
  load is balanced. A custom VJP keeps every residual independent of the
  chosen C (saved per assignment, not per slot) and moves data with gathers
  only, no scatters. Under expert parallelism the padded buffer travels with
  ``all_to_all``.
* ``ragged_dot``: sort, ``jax.lax.ragged_dot`` per projection, unsort;
  dropless, no padding. Native on TPU; dense-materialized on GPU (jax 0.10)
  and tens of times a dense matmul on CPU.
* ``tokamax``: the same sort/unsort plan with ``tokamax.ragged_dot`` (the
  optional ``kernels`` extra: Pallas grouped GEMMs, Mosaic on TPU and
  Hopper/Blackwell GPUs, Triton on other GPUs, ``jax.lax.ragged_dot`` on CPU).
* ``onehot``: the GShard formulation with ``[N, E, C]`` one-hot
  dispatch/combine tensors; capacity mode only; kept as the naive baseline.

Expert parallelism: under a mesh (``jax.set_mesh``) the dispatch runs in
``jax.shard_map``; each device routes its own tokens, and the experts are
split over the ``fsdp`` and ``expert`` axes (``moejax.sharding.expert_axes``:
P = fsdp * expert devices hold E / P whole experts each); the padded buffers
go to their experts with ``all_to_all`` over those axes and come back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.layers import library_kernels
from moejax.layers.mlp import swiglu
from moejax.registry import Registry
from moejax.sharding import BATCH_AXES, expert_axes  # mesh axes that split the batch, and the experts

# Dropless ``einsum`` capacities, as multiples of the mean load N * top_k / E
# (rounded up to 8 rows); the number of tokens N always closes the ladder.
DROPLESS_LADDER = (1.0, 1.125, 1.25, 1.375, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0)


class ExpertWeights(NamedTuple):
  """Stacked routed-expert weights (compute dtype)."""

  gate_ExDxF: jax.Array
  up_ExDxF: jax.Array
  down_ExFxD: jax.Array


@dataclasses.dataclass(frozen=True)
class DispatchSpec:
  """Static dispatch settings (from ``model.moe``)."""

  num_experts: int
  top_k: int
  dropless: bool = True
  capacity_factor: float = 1.25
  backend: str = "einsum"
  swiglu_limit: float = 0.0


class Backend(NamedTuple):
  """A grouped-matmul backend, the modes it supports and the module it needs."""

  fn: Callable  # (x_NxD, expert_AxN, weight_AxN, ExpertWeights, DispatchSpec, ep_axes) -> (y_NxD, dropped)
  dropless: bool
  capacity: bool
  expert_parallel: bool
  requires: str = ""  # an optional package the backend imports ("" = none)


BACKENDS = Registry("moe backend")


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
  """Slots per expert: ``ceil(factor * N * top_k / E)``, at most N."""
  return max(1, min(num_tokens, math.ceil(factor * num_tokens * top_k / num_experts)))


def dropless_capacities(num_tokens: int, top_k: int, num_experts: int) -> tuple[int, ...]:
  """The static capacities dropless ``einsum`` chooses from (ascending, last = N)."""
  mean = num_tokens * top_k / num_experts
  caps = {min(num_tokens, 8 * math.ceil(mean * r / 8)) for r in DROPLESS_LADDER}
  return tuple(sorted(caps | {num_tokens}))


def available(name: str, platform: str | None = None) -> bool:
  """Whether backend ``name`` can run on ``platform`` (its optional package installed and working there)."""
  return unavailable_because(name, platform) is None


def unavailable_because(name: str, platform: str | None = None) -> str | None:
  """Why backend ``name`` cannot run on ``platform`` (None: it can)."""
  requires = BACKENDS.get(name).requires
  if requires == "tokamax":
    return library_kernels.tokamax_problem(platform)
  if requires and not library_kernels.installed(requires):
    return f"the {requires!r} package is not installed (pip install -e '.[kernels]')"
  return None


def resolve_backend(name: str, dropless: bool, expert_parallel: bool, platform: str | None = None) -> str:
  """``auto`` -> a grouped GEMM on TPU and GPU when dropless without expert
  parallelism: ``tokamax`` where installed and usable (its GPU kernels fail
  with JAX >= 0.11, seen on an H100: ``library_kernels.tokamax_problem``),
  else ``ragged_dot`` on TPU; in every other case ``einsum``. Measured on CPU
  (einsum fastest there); the per-backend comparison on a GPU or TPU is not
  yet measured (``benchmarks/accelerator.py`` times every backend on one layer)."""
  if name != "auto":
    return name
  platform = platform or jax.default_backend()
  if not dropless or expert_parallel or platform not in ("tpu", "gpu"):
    return "einsum"
  if available("tokamax", platform):
    return "tokamax"
  return "ragged_dot" if platform == "tpu" else "einsum"


# ----------------------------------------------------------------------------- plan

class Plan(NamedTuple):
  """Assignments (slot-major: a = k * N + n) grouped by expert."""

  expert_M: jax.Array  # int32 [M], M = A * N; E = empty slot
  order_M: jax.Array   # assignment ids sorted by expert (stable: first choices, then earlier tokens, first)
  counts_E: jax.Array  # assignments per expert
  starts_E: jax.Array  # first sorted position of each expert
  rank_M: jax.Array    # position of each assignment within its expert's group


def make_plan(expert_AxN: jax.Array, num_experts: int) -> Plan:
  e_M = expert_AxN.reshape(-1).astype(jnp.int32)
  m = e_M.shape[0]
  order_M = jnp.argsort(e_M, stable=True).astype(jnp.int32)
  counts_E = jnp.zeros(num_experts, jnp.int32).at[e_M].add(1, mode="drop")
  starts_E = jnp.cumsum(counts_E) - counts_E
  sorted_rank = jnp.arange(m, dtype=jnp.int32) - starts_E[jnp.minimum(e_M[order_M], num_experts - 1)]
  rank_M = jnp.zeros(m, jnp.int32).at[order_M].set(sorted_rank)
  return Plan(e_M, order_M, counts_E, starts_E, rank_M)


class PaddedMaps(NamedTuple):
  """Index maps between assignments and a padded ``[E, C]`` buffer."""

  assign_ExC: jax.Array  # assignment held by each slot
  valid_ExC: jax.Array   # slot holds an assignment
  slot_M: jax.Array      # flat slot e * C + rank of each assignment
  kept_M: jax.Array      # assignment has a slot (not dropped, not empty)


def padded_maps(plan: Plan, cap: int) -> PaddedMaps:
  m = plan.expert_M.shape[0]
  c = jnp.arange(cap, dtype=jnp.int32)
  valid = c[None] < plan.counts_E[:, None]
  assign = plan.order_M[jnp.minimum(plan.starts_E[:, None] + c[None], m - 1)]
  kept = (plan.expert_M < plan.counts_E.shape[0]) & (plan.rank_M < cap)
  return PaddedMaps(assign, valid, jnp.where(kept, plan.expert_M * cap + plan.rank_M, 0), kept)


def _combine(y_AxNxD, weight_AxN):
  return jnp.einsum("AND,AN->ND", y_AxNxD, weight_AxN.astype(y_AxNxD.dtype))


# ----------------------------------------------------------------------------- einsum

def _up(x_ExCxD, w_gate_ExDxF, w_up_ExDxF):
  return (jnp.einsum("ECD,EDF->ECF", x_ExCxD, w_gate_ExDxF), jnp.einsum("ECD,EDF->ECF", x_ExCxD, w_up_ExDxF))


def _down(h_ExCxF, w_down_ExFxD):
  return jnp.einsum("ECF,EFD->ECD", h_ExCxF, w_down_ExFxD)


class _Exchange(NamedTuple):
  """Moves a padded ``[E, C, X]`` buffer to the devices holding the experts
  (``[E/P, P*C, X]``, rows grouped by source device) and back; ``axes``: the
  mesh axes splitting the experts (() = none), P the product of their sizes."""

  axes: tuple[str, ...]

  @property
  def size(self) -> int:
    return math.prod(jax.lax.axis_size(a) for a in self.axes)

  def to_experts(self, a_ExCxX):
    if not self.axes:
      return a_ExCxX
    e, c, x = a_ExCxX.shape
    p = self.size
    a = jax.lax.all_to_all(a_ExCxX.reshape(p, e // p, c, x), self.axes, 0, 0, tiled=True)
    return a.transpose(1, 0, 2, 3).reshape(e // p, p * c, x)

  def from_experts(self, a_LxPCxX):
    if not self.axes:
      return a_LxPCxX
    el, pc, x = a_LxPCxX.shape
    p = self.size
    a = a_LxPCxX.reshape(el, p, pc // p, x).transpose(1, 0, 2, 3)
    return jax.lax.all_to_all(a, self.axes, 0, 0, tiled=True).reshape(el * p, pc // p, x)


def _pad(a_NxX, maps: PaddedMaps, num_tokens: int | None = None):
  """Assignment rows (or, with ``num_tokens``, token rows) -> padded [E, C, X]."""
  rows = maps.assign_ExC % num_tokens if num_tokens else maps.assign_ExC
  return jnp.where(maps.valid_ExC[..., None], a_NxX[rows], 0)


def _unpad(a_ExCxX, maps: PaddedMaps):
  """Padded [E, C, X] -> assignment rows [M, X] (zero where dropped)."""
  e, c, x = a_ExCxX.shape
  return jnp.where(maps.kept_M[:, None], a_ExCxX.reshape(e * c, x)[maps.slot_M], 0)


def _at_capacity(caps: tuple[int, ...], branch, fn, *args):
  """``fn(caps[branch], *args)``: a plain call for one capacity, else ``lax.switch``."""
  if len(caps) == 1:
    return fn(caps[0], *args)
  return jax.lax.switch(branch, [functools.partial(fn, cap) for cap in caps], *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _padded_experts(caps: tuple[int, ...], limit: float, exchange: _Exchange, branch, x_NxD, plan: Plan,
                    w: ExpertWeights):
  """Per-assignment expert outputs ``y_MxD`` through a padded ``[E, C, D]``
  buffer with C = ``caps[branch]`` (zero for dropped assignments).

  The custom VJP keeps the residuals independent of C, so a ``lax.switch``
  over capacities does not hold residuals for every branch: the inputs, and
  on one device the gate/up pre-activations per assignment ``[M, F]``; under
  expert parallelism those live on other devices and are recomputed instead.
  """
  return _padded_experts_fwd(caps, limit, exchange, branch, x_NxD, plan, w)[0]


def _padded_experts_fwd(caps, limit, exchange, branch, x_NxD, plan, w):
  keep = not exchange.axes

  def forward(cap, x_NxD, w):
    maps = padded_maps(plan, cap)
    x_e = exchange.to_experts(_pad(x_NxD, maps, x_NxD.shape[0]))
    g_e, u_e = _up(x_e, w.gate_ExDxF, w.up_ExDxF)
    y_M = _unpad(exchange.from_experts(_down(swiglu(g_e, u_e, limit), w.down_ExFxD)), maps)
    return y_M, ((_unpad(g_e, maps), _unpad(u_e, maps)) if keep else None)

  y_M, gate_up_M = _at_capacity(caps, branch, forward, x_NxD, w)
  return y_M, (branch, x_NxD, plan, w, gate_up_M)


def _padded_experts_bwd(caps, limit, exchange, res, dy_MxD):
  branch, x_NxD, plan, w, gate_up_M = res
  n = x_NxD.shape[0]

  def backward(cap, x_NxD, w, dy_MxD, gate_up_M):
    maps = padded_maps(plan, cap)
    x_e = exchange.to_experts(_pad(x_NxD, maps, n))
    dy_e = exchange.to_experts(_pad(dy_MxD, maps))
    if gate_up_M is None:
      g_e, u_e = _up(x_e, w.gate_ExDxF, w.up_ExDxF)
    else:
      g_e, u_e = (_pad(a, maps) for a in gate_up_M)
    h_e, act_vjp = jax.vjp(lambda g, u: swiglu(g, u, limit), g_e, u_e)
    dh_e, d_down = jax.vjp(_down, h_e, w.down_ExFxD)[1](dy_e)
    dx_e, d_gate, d_up = jax.vjp(_up, x_e, w.gate_ExDxF, w.up_ExDxF)[1](act_vjp(dh_e))
    dx_M = _unpad(exchange.from_experts(dx_e), maps)
    return dx_M.reshape(-1, n, dx_M.shape[-1]).sum(0), ExpertWeights(d_gate, d_up, d_down)

  dx_NxD, dw = _at_capacity(caps, branch, backward, x_NxD, w, dy_MxD, gate_up_M)
  return None, dx_NxD, jax.tree.map(lambda _: None, plan), dw


_padded_experts.defvjp(_padded_experts_fwd, _padded_experts_bwd)


def _einsum_dispatch(x_NxD, expert_AxN, weight_AxN, w: ExpertWeights, spec: DispatchSpec, ep_axes: tuple[str, ...]):
  k, n = expert_AxN.shape
  plan = make_plan(expert_AxN, spec.num_experts)
  if spec.dropless:
    caps = dropless_capacities(n, spec.top_k, spec.num_experts)
    most = jnp.max(plan.counts_E)
    if ep_axes:  # every device of an all_to_all group must take the same branch
      most = jax.lax.pmax(most, ep_axes)
    branch = jnp.searchsorted(jnp.asarray(caps), most).astype(jnp.int32)
  else:
    caps, branch = (capacity(n, spec.top_k, spec.num_experts, spec.capacity_factor),), jnp.zeros((), jnp.int32)
  y_M = _padded_experts(caps, spec.swiglu_limit, _Exchange(tuple(ep_axes)), branch, x_NxD, plan, w)
  dropped = jnp.sum((plan.expert_M < spec.num_experts) & (plan.rank_M >= jnp.asarray(caps)[branch]))
  return _combine(y_M.reshape(k, n, -1), weight_AxN), dropped


BACKENDS.register("einsum")(Backend(_einsum_dispatch, dropless=True, capacity=True, expert_parallel=True))


# ----------------------------------------------------------------------------- ragged_dot, tokamax

def _grouped_dispatch(ragged_dot: Callable, x_NxD, expert_AxN, weight_AxN, w: ExpertWeights, spec: DispatchSpec,
                      ep_axes: tuple[str, ...]):
  """Sort assignments by expert, ``ragged_dot(x_MxD, w_ExDxF, counts_E)`` per
  projection, unsort; dropless, no padding."""
  del ep_axes
  k, n = expert_AxN.shape
  plan = make_plan(expert_AxN, spec.num_experts)
  x_MxD = x_NxD[plan.order_M % n]  # sorted by expert; empty slots sort last, outside every group
  gate_MxF = ragged_dot(x_MxD, w.gate_ExDxF, plan.counts_E)
  up_MxF = ragged_dot(x_MxD, w.up_ExDxF, plan.counts_E)
  y_sorted = ragged_dot(swiglu(gate_MxF, up_MxF, spec.swiglu_limit), w.down_ExFxD, plan.counts_E)
  inverse_M = plan.starts_E[jnp.minimum(plan.expert_M, spec.num_experts - 1)] + plan.rank_M
  y_M = jnp.where((plan.expert_M < spec.num_experts)[:, None], y_sorted[inverse_M], 0)
  return _combine(y_M.reshape(k, n, -1), weight_AxN), jnp.zeros((), jnp.int32)


def _tokamax_ragged_dot(x_MxD, w_ExDxF, counts_E):
  return library_kernels.tokamax().ragged_dot(x_MxD, w_ExDxF, counts_E)


BACKENDS.register("ragged_dot")(Backend(functools.partial(_grouped_dispatch, jax.lax.ragged_dot), dropless=True,
                                        capacity=False, expert_parallel=False))
BACKENDS.register("tokamax")(Backend(functools.partial(_grouped_dispatch, _tokamax_ragged_dot), dropless=True,
                                     capacity=False, expert_parallel=False, requires="tokamax"))


# ----------------------------------------------------------------------------- onehot

def _onehot_dispatch(x_NxD, expert_AxN, weight_AxN, w: ExpertWeights, spec: DispatchSpec, ep_axes: tuple[str, ...]):
  del ep_axes
  k, n = expert_AxN.shape
  e = spec.num_experts
  cap = capacity(n, spec.top_k, e, spec.capacity_factor)
  plan = make_plan(expert_AxN, e)
  kept_AxN = ((plan.expert_M < e) & (plan.rank_M < cap)).reshape(k, n)
  # [A, N, E, C]: assignment (k, n) sits in slot (expert, rank) when kept.
  onehot_AxNxExC = (jax.nn.one_hot(expert_AxN, e, dtype=x_NxD.dtype)[..., None]
                    * jax.nn.one_hot(plan.rank_M.reshape(k, n), cap, dtype=x_NxD.dtype)[:, :, None, :]
                    * kept_AxN[..., None, None].astype(x_NxD.dtype))
  dispatch_NxExC = onehot_AxNxExC.sum(0)
  combine_NxExC = jnp.einsum("ANEC,AN->NEC", onehot_AxNxExC, weight_AxN.astype(x_NxD.dtype))
  x_ExCxD = jnp.einsum("NEC,ND->ECD", dispatch_NxExC, x_NxD)
  y_ExCxD = _down(swiglu(*_up(x_ExCxD, w.gate_ExDxF, w.up_ExDxF), spec.swiglu_limit), w.down_ExFxD)
  dropped = jnp.sum((expert_AxN < e) & ~kept_AxN)
  return jnp.einsum("NEC,ECD->ND", combine_NxExC, y_ExCxD), dropped


BACKENDS.register("onehot")(Backend(_onehot_dispatch, dropless=False, capacity=True, expert_parallel=False))


# ----------------------------------------------------------------------------- entry point

def dispatch(x_BxTxD, expert_BxTxA, weight_BxTxA, w: ExpertWeights, spec: DispatchSpec):
  """Routed-expert outputs ``y_BxTxD`` and the number of dropped assignments.

  Without a mesh (or when no token axis is split) the backend runs directly.
  Under a mesh it runs per device in ``jax.shard_map`` on that device's
  tokens (batch over data/fsdp/expert, length over context), with the
  experts split over ``expert_axes`` (fsdp and expert) for a backend that
  supports expert parallelism (the others get every expert, gathered); so
  capacity is per device-local token group (as in GShard). Mesh axes other
  than moejax's count as size 1.
  """
  backend = BACKENDS.get(spec.backend)
  mesh = jax.sharding.get_abstract_mesh()
  x_BxTxD, expert_BxTxA, weight_BxTxA = map(jnp.asarray, (x_BxTxD, expert_BxTxA, weight_BxTxA))

  def local(x_BxTxD, expert_BxTxA, weight_BxTxA, w, ep_axes=()):
    b, t, d = x_BxTxD.shape
    to_AxN = lambda a: a.reshape(b * t, -1).T
    y_NxD, dropped = backend.fn(x_BxTxD.reshape(b * t, d), to_AxN(expert_BxTxA), to_AxN(weight_BxTxA), w, spec,
                                ep_axes)
    return y_NxD.reshape(b, t, d), dropped

  size = {a: mesh.shape.get(a, 1) for a in (*BATCH_AXES, "context")} if not mesh.empty else {}
  token_axes = tuple(a for a in BATCH_AXES if size.get(a, 1) > 1)
  context = "context" if size.get("context", 1) > 1 else None
  b, t, _ = x_BxTxD.shape
  if not (token_axes or context) or b % math.prod(size[a] for a in token_axes) or t % size.get("context", 1):
    # No mesh, or a batch the mesh cannot split (e.g. the one-row dummy of
    # model.init): the plain computation, partitioned by the compiler.
    return local(x_BxTxD, expert_BxTxA, weight_BxTxA, w)
  # Expert axes split the batch too (BATCH_AXES), so every device of an all_to_all group has its own tokens.
  ep_axes = expert_axes(mesh.shape, spec.num_experts) if backend.expert_parallel else ()
  summed_axes = token_axes + ((context,) if context else ())
  replicated_axes = tuple(a for a in summed_axes if a not in ep_axes)  # same experts, different tokens

  def per_device(x_BxTxD, expert_BxTxA, weight_BxTxA, w):
    # Each device computes weight gradients from its own tokens; marking the
    # weights as varying over those axes makes AD sum the gradients there.
    if replicated_axes:
      w = jax.tree.map(lambda a: jax.lax.pcast(a, replicated_axes, to="varying"), w)
    y, dropped = local(x_BxTxD, expert_BxTxA, weight_BxTxA, w, ep_axes)
    return y, jax.lax.psum(dropped, summed_axes) if summed_axes else dropped

  tok = P(token_axes or None, context)
  wspec = P(ep_axes or None)
  return jax.shard_map(per_device, in_specs=(tok, tok, tok, ExpertWeights(wspec, wspec, wspec)),
                       out_specs=(tok, P()))(x_BxTxD, expert_BxTxA, weight_BxTxA, w)
