"""Muon: momentum orthogonalized by Newton–Schulz, for the weight matrices.

Keller Jordan et al., 2024 ("Muon: an optimizer for hidden layers"); Liu et
al., 2025 ("Muon is scalable for LLM training", Moonlight: RMS matching and
weight decay); Li et al., 2025 (NorMuon). For each weight *matrix* ``W``
(fan_in x fan_out) with gradient ``G``::

    M <- beta M + (1 - beta) G;   D = beta M + (1 - beta) G (Nesterov) or M
    O = NS(D)  ~  U V^T  (moejax/optim/newton_schulz.py)
    W <- W - lr (s O + wd W),  s = rms * sqrt(max(fan_in, fan_out))   (moonlight)
                               s = sqrt(max(1, fan_out / fan_in))      (keller)

Everything that is not a matrix (embeddings, LM head, norms, biases, router
gates, hyper-connection parameters) goes to AdamW. :func:`muon` takes any
pytree; which leaves are matrices, and how a leaf is one, comes from its
logical axis names when given (see :func:`classify`), else from its shape.

Matrices of the same shape are stacked and orthogonalized in one batched
call. Under a mesh (``jax.set_mesh``) each stack is laid out so that every
device holds *whole* matrices (along the mesh axes the parameters are
sharded over) before the iteration, and the results go back to the
parameters' layout: a matrix is gathered onto one device, never onto all,
and expert stacks (experts split over ``fsdp`` and ``expert``,
``moejax.sharding.EXPERT_AXES``; also stacked over scanned layers) are
orthogonalized where they lie, without any collective.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from moejax.config import MUON_EXCLUDE, muon_config
from moejax.optim.newton_schulz import COEFFICIENTS, newton_schulz, orthogonality_error
from moejax.optim.registry import OPTIMIZERS, ParamLayout, weight_decay_mask
from moejax.tree_paths import by_path, flatten, layer_name, path_str

# Logical axes along which a stack holds independent matrices (one per expert; one per scanned layer).
STACK_AXES = ("expert", "layers")
# A leaf with one of these logical axes goes to AdamW (embeddings, LM head).
ADAM_AXES = ("vocab",)
# Path patterns (``re.search`` on "layer_0/mlp/router/w_gate") sent to AdamW (the
# schema's default ``optim.muon.exclude``, moejax/config.py).
DEFAULT_EXCLUDE = MUON_EXCLUDE
SCALES = ("moonlight", "keller")


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
  """How a leaf is a (stack of) matrices: axis indices of each role."""

  batch: tuple[int, ...]    # independent matrices (experts)
  fan_in: tuple[int, ...]   # contracted with the layer input
  fan_out: tuple[int, ...]

  def sizes(self, shape) -> tuple[int, int]:
    return math.prod(shape[a] for a in self.fan_in), math.prod(shape[a] for a in self.fan_out)

  def to_matrices(self, x):
    """x -> [*batch, fan_in, fan_out]."""
    m, n = self.sizes(x.shape)
    y = jnp.transpose(x, self.batch + self.fan_in + self.fan_out)
    return y.reshape(*(x.shape[a] for a in self.batch), m, n)

  def from_matrices(self, y, shape):
    order = self.batch + self.fan_in + self.fan_out
    y = y.reshape(*(shape[a] for a in order))
    return jnp.transpose(y, tuple(order.index(a) for a in range(len(shape))))


def classify(path: str, shape: Sequence[int], axes: Sequence[str | None] | None,
             exclude: Sequence[str] = DEFAULT_EXCLUDE) -> MatrixSpec | None:
  """The matrix view of a parameter, or None if it belongs to AdamW.

  With logical ``axes``: ``expert`` axes are batch axes; a ``vocab`` axis
  means AdamW; of the remaining axes, if the last is ``embed`` it is the
  output and the others the input (``w_o [H, Dh, D]``, ``w_down [E, F, D]``),
  otherwise the first is the input and the others the output (``w_q [D, H,
  Dh]``, ``w_gate [E, D, F]``). Without axes only 2-D leaves are matrices
  (rows = fan_in). Fewer than two non-batch axes, or a path matching an
  ``exclude`` pattern, means AdamW.
  """
  if any(re.search(pattern, path) for pattern in exclude):
    return None
  if axes is None or len(axes) != len(shape):
    return MatrixSpec((), (0,), (1,)) if len(shape) == 2 else None
  if any(a in ADAM_AXES for a in axes):
    return None
  batch = tuple(i for i, a in enumerate(axes) if a in STACK_AXES)
  rest = tuple(i for i in range(len(shape)) if i not in batch)
  if len(rest) < 2:
    return None
  if axes[rest[-1]] == "embed":
    return MatrixSpec(batch, rest[:-1], rest[-1:])
  return MatrixSpec(batch, rest[:1], rest[1:])


def matrix_specs(params, logical_axes=None, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> dict[str, MatrixSpec | None]:
  """{path: MatrixSpec or None (AdamW)} for every leaf of ``params`` (boxed or not)."""
  axes = by_path(logical_axes)
  return {path: classify(path, leaf.shape, axes.get(path), exclude) for path, leaf in flatten(params).items()}


class MuonState(NamedTuple):
  count: jax.Array
  momentum: optax.Updates
  neuron_moment: optax.Updates  # NorMuon's per-output-neuron E[o^2] (keepdims shape); None when off
  metrics: dict[str, jax.Array]  # "layer_i/ns_error" (see optimizer_metrics)


def _sharded_dims(pspec, ndim: int, mesh) -> list[tuple[str, ...]]:
  """Per dimension of a leaf with partition spec ``pspec``: the mesh axes (size > 1) that split it."""
  entries = list(pspec) + [None] * (ndim - len(pspec))
  return [tuple(n for n in (e if isinstance(e, tuple) else (e,)) if n is not None and mesh.shape[n] > 1)
          for e in entries]


def _owner_axes(spec: MatrixSpec, pspec, ndim: int, mesh) -> tuple[str, ...]:
  """Mesh axes (size > 1) the leaf is sharded over: batch axes first, then matrix axes."""
  dims = _sharded_dims(pspec, ndim, mesh)
  return tuple(dict.fromkeys(n for dim in spec.batch + spec.fan_in + spec.fan_out for n in dims[dim]))


def _sharded_batch_first(spec: MatrixSpec, pspec, ndim: int, mesh) -> MatrixSpec:
  """``spec`` with the batch axes that are sharded (over mesh axes of size > 1) moved first, so that
  flattening the batch keeps them major: a stack [layers, experts / P, ...] of experts split over P
  devices flattens to matrices those devices already hold, with no data moved."""
  dims = _sharded_dims(pspec, ndim, mesh)
  batch = tuple(d for d in spec.batch if dims[d]) + tuple(d for d in spec.batch if not dims[d])
  return dataclasses.replace(spec, batch=batch)


def _orthogonalize(leaves: list[tuple[str, jax.Array, MatrixSpec]], mesh_specs: dict, coefficients: str,
                   ns_steps: int, ns_dtype) -> tuple[list[jax.Array], list[jax.Array]]:
  """NS of every leaf, same-shape leaves batched; returns (outputs, per-leaf max error)."""
  mesh = jax.sharding.get_abstract_mesh()
  sharded = not mesh.empty and mesh.size > 1
  groups: dict[tuple, list[int]] = {}
  leaves = list(leaves)
  for i, (path, x, spec) in enumerate(leaves):
    if sharded and path in mesh_specs:
      spec = _sharded_batch_first(spec, mesh_specs[path], x.ndim, mesh)
      leaves[i] = (path, x, spec)
    owner = _owner_axes(spec, mesh_specs[path], x.ndim, mesh) if sharded and path in mesh_specs else ()
    key = (tuple(x.shape[a] for a in spec.batch), spec.sizes(x.shape), x.dtype, owner)
    groups.setdefault(key, []).append(i)

  outputs: list[Any] = [None] * len(leaves)
  errors: list[Any] = [None] * len(leaves)
  for (batch_shape, (m, n), _, owner), members in groups.items():
    stack = jnp.stack([leaves[i][2].to_matrices(leaves[i][1]) for i in members], axis=len(batch_shape))
    flat_NxMxK = stack.reshape(-1, m, n)  # the stacked axis is minor, so batch shards stay put
    if owner:
      flat_NxMxK = jax.lax.with_sharding_constraint(flat_NxMxK, P(owner, None, None))
    o_NxMxK = newton_schulz(flat_NxMxK, coefficients, ns_steps, ns_dtype)
    err_N = orthogonality_error(o_NxMxK)
    o_stack = o_NxMxK.reshape(stack.shape)
    err_stack = err_N.reshape(*batch_shape, len(members))
    for j, i in enumerate(members):
      path, x, spec = leaves[i]
      out = spec.from_matrices(jax.lax.index_in_dim(o_stack, j, len(batch_shape), keepdims=False), x.shape)
      if sharded and path in mesh_specs:
        out = jax.lax.with_sharding_constraint(out, P(*mesh_specs[path]))
      outputs[i] = out
      errors[i] = jnp.max(jax.lax.index_in_dim(err_stack, j, len(batch_shape), keepdims=False))
  return outputs, errors


def _neuron_shape(shape, spec: MatrixSpec) -> tuple[int, ...]:
  return tuple(1 if a in spec.fan_in else s for a, s in enumerate(shape))


def scale_by_muon(*, logical_axes=None, mesh_axes=None, beta: float = 0.95, nesterov: bool = True, coefficients: str = "quintic", ns_steps: int = 5,
                  ns_dtype=jnp.bfloat16, scale: str = "moonlight", rms: float = 0.2, normuon: bool = False,
                  normuon_b2: float = 0.95, diagnostics: bool = True) -> optax.GradientTransformation:
  """Muon's direction for every leaf (all must be matrices): momentum, NS, scaling.

  ``logical_axes`` / ``mesh_axes``: trees (or {path: value} dicts) of logical
  axis names and of mesh PartitionSpecs, matched to leaves by path. NorMuon
  (``normuon``): after NS, each output neuron (fan_out index) is divided by
  the root of its EMA'd mean square, then the matrix is rescaled to its
  pre-normalisation Frobenius norm, so ``scale`` keeps its meaning.
  """
  if scale not in SCALES:
    raise ValueError(f"scale={scale!r}: expected one of {SCALES}")
  axes_table, mesh_table = by_path(logical_axes), by_path(mesh_axes)

  def leaf_specs(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = []
    for p, leaf in flat:
      path = path_str(p)
      spec = classify(path, leaf.shape, axes_table.get(path), exclude=())
      if spec is None:
        raise ValueError(f"scale_by_muon got {path} of shape {leaf.shape}, which is not a matrix; "
                         "route it to another optimizer (moejax.optim.muon does).")
      specs.append((path, spec))
    return flat, treedef, specs

  def init_fn(params):
    layers = sorted({layer_name(path) for path in flatten(params)})
    neuron = None
    if normuon:
      neuron = jax.tree_util.tree_map_with_path(
          lambda p, x: jnp.zeros(_neuron_shape(x.shape, classify(path_str(p), x.shape,
                                                                 axes_table.get(path_str(p)), ())), jnp.float32),
          params)
    metrics = {f"{layer}/ns_error": jnp.zeros((), jnp.float32) for layer in layers} if diagnostics else {}
    return MuonState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params), neuron, metrics)

  def update_fn(updates, state: MuonState, params=None):
    del params
    momentum = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g.astype(m.dtype), state.momentum, updates)
    direction = (jax.tree.map(lambda m, g: beta * m + (1 - beta) * g.astype(m.dtype), momentum, updates)
                 if nesterov else momentum)
    flat, treedef, specs = leaf_specs(direction)
    leaves = [(path, x, spec) for (_, x), (path, spec) in zip(flat, specs)]
    outs, errors = _orthogonalize(leaves, mesh_table, coefficients, ns_steps, ns_dtype)

    neuron_moment = state.neuron_moment
    if normuon:
      old = jax.tree.leaves(state.neuron_moment)
      new_moments = []
      for k, ((path, x, spec), o) in enumerate(zip(leaves, outs)):
        v = normuon_b2 * old[k] + (1 - normuon_b2) * jnp.mean(o * o, axis=spec.fan_in, keepdims=True)
        normed = o / (jnp.sqrt(v) + 1e-8)
        matrix_axes = spec.fan_in + spec.fan_out
        ratio = jnp.sqrt(jnp.sum(o * o, axis=matrix_axes, keepdims=True)
                         / jnp.maximum(jnp.sum(normed * normed, axis=matrix_axes, keepdims=True), 1e-30))
        outs[k] = normed * ratio
        new_moments.append(v)
      neuron_moment = jax.tree.unflatten(jax.tree.structure(state.neuron_moment), new_moments)

    scaled = []
    for (path, x, spec), o in zip(leaves, outs):
      fan_in, fan_out = spec.sizes(x.shape)
      s = rms * math.sqrt(max(fan_in, fan_out)) if scale == "moonlight" else math.sqrt(max(1.0, fan_out / fan_in))
      scaled.append((s * o).astype(x.dtype))

    metrics = state.metrics
    if diagnostics:
      per_layer: dict[str, list] = {}
      for (path, _, _), err in zip(leaves, errors):
        per_layer.setdefault(f"{layer_name(path)}/ns_error", []).append(err)
      metrics = {k: jnp.max(jnp.stack(v)) for k, v in per_layer.items()}
    new_state = MuonState(optax.safe_increment(state.count), momentum, neuron_moment, metrics)
    return jax.tree_util.tree_unflatten(treedef, scaled), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def muon(learning_rate: optax.ScalarOrSchedule, *, logical_axes=None, mesh_axes=None,
         exclude: Sequence[str] = DEFAULT_EXCLUDE, beta: float = 0.95, nesterov: bool = True,
         coefficients: str = "quintic", ns_steps: int = 5, ns_dtype=jnp.bfloat16, scale: str = "moonlight",
         rms: float = 0.2, weight_decay: float = 0.1, normuon: bool = False, normuon_b2: float = 0.95,
         adam_learning_rate: optax.ScalarOrSchedule | None = None, adam_b1: float = 0.9, adam_b2: float = 0.95,
         adam_eps: float = 1e-8, adam_weight_decay: float | None = None,
         diagnostics: bool = True) -> optax.GradientTransformation:
  """Muon for the matrices of ``params``, AdamW for every other leaf.

  ``moejax.optim.muon(3e-3)`` works on any pytree, e.g. ``{"w": [m, n], "b":
  [n]}`` (``w`` orthogonalized, ``b`` to AdamW). Pass ``logical_axes`` (a
  tree of axis-name tuples, e.g. ``nn.get_partition_spec(boxed_params)``)
  to treat stacked experts and head-shaped projections as matrices, and
  ``mesh_axes`` (PartitionSpecs) to control the layout of the iteration
  under a mesh. The AdamW branch uses ``adam_*`` (learning rate defaults to
  ``learning_rate``: with ``scale='moonlight'`` the two branches' update RMS
  match, so one learning rate and weight decay serve both; b2 0.95) and
  decays matrices only. ``weight_decay`` is decoupled (``W -= lr wd W``).
  """
  specs_of = lambda params: matrix_specs(params, logical_axes, exclude)

  def labels(params):
    specs = specs_of(params)
    return jax.tree_util.tree_map_with_path(lambda p, _: "muon" if specs[path_str(p)] else "adam", params)

  muon_branch = optax.chain(
      scale_by_muon(logical_axes=logical_axes, mesh_axes=mesh_axes, beta=beta, nesterov=nesterov,
                    coefficients=coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype, scale=scale, rms=rms,
                    normuon=normuon, normuon_b2=normuon_b2, diagnostics=diagnostics),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))
  adam_branch = optax.adamw(learning_rate if adam_learning_rate is None else adam_learning_rate,
                            b1=adam_b1, b2=adam_b2, eps=adam_eps,
                            weight_decay=weight_decay if adam_weight_decay is None else adam_weight_decay,
                            mask=weight_decay_mask)
  return optax.partition({"muon": muon_branch, "adam": adam_branch}, labels)


def optimizer_metrics(opt_state) -> dict[str, jax.Array]:
  """The diagnostics every Muon state in ``opt_state`` holds (ns_error per layer)."""
  found = {}
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MuonState)):
    if isinstance(node, MuonState):
      found.update(node.metrics)
  return found


def _dtype(name: str):
  return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def _adam_lr(o: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.Schedule:
  ratio = o.muon.adam_lr_ratio
  return lambda step: ratio * lr(step)


def validate_muon_options(cfg: ml_collections.ConfigDict) -> list[str]:
  """Errors of ``optim.muon.*`` (checked wherever the section is present, so a sweep arm that
  switches to Muon cannot start from bad options)."""
  e: list[str] = []
  need = lambda ok, msg: ok or e.append(msg)
  mu = cfg.optim.muon
  need(0.0 <= mu.momentum < 1.0, f"optim.muon.momentum={mu.momentum} must be in [0, 1).")
  need(mu.coefficients in COEFFICIENTS,
       f"optim.muon.coefficients={mu.coefficients!r} is unknown; known: {', '.join(sorted(COEFFICIENTS))}.")
  need(mu.ns_steps >= 1, f"optim.muon.ns_steps={mu.ns_steps} must be >= 1 (5 is standard).")
  need(mu.ns_dtype in ("bfloat16", "float32"), f"optim.muon.ns_dtype={mu.ns_dtype!r} must be 'bfloat16' or 'float32'.")
  need(mu.scale in SCALES, f"optim.muon.scale={mu.scale!r} is not one of {SCALES}.")
  need(mu.rms > 0, f"optim.muon.rms={mu.rms} must be > 0 (0.2 matches AdamW's update RMS).")
  need(mu.adam_lr_ratio > 0, f"optim.muon.adam_lr_ratio={mu.adam_lr_ratio} must be > 0.")
  for pattern in mu.exclude:
    try:
      re.compile(pattern)
    except re.error as err:
      e.append(f"optim.muon.exclude: {pattern!r} is not a regular expression ({err}); fix or remove it.")
  return e


_MUON_OPTIONS = dict(section="muon", defaults=muon_config, validate_config=validate_muon_options)


@OPTIMIZERS.register("muon", **_MUON_OPTIONS)
def muon_from_config(o: ml_collections.ConfigDict, lr: optax.Schedule,
                     layout: ParamLayout | None) -> optax.GradientTransformation:
  """``optim.muon.*``; the AdamW branch uses ``b1``, ``b2``, ``eps``, ``weight_decay``
  and ``learning_rate * muon.adam_lr_ratio``."""
  mu = o.muon
  return muon(lr, logical_axes=layout and layout.logical_axes, mesh_axes=layout and layout.mesh_axes,
              exclude=tuple(mu.exclude), beta=mu.momentum, nesterov=mu.nesterov, coefficients=mu.coefficients,
              ns_steps=mu.ns_steps, ns_dtype=_dtype(mu.ns_dtype), scale=mu.scale, rms=mu.rms,
              weight_decay=o.weight_decay, normuon=mu.normuon, normuon_b2=o.b2,
              adam_learning_rate=_adam_lr(o, lr), adam_b1=o.b1, adam_b2=o.b2, adam_eps=o.eps)


@OPTIMIZERS.register("optax_muon", **_MUON_OPTIONS)
def optax_muon_from_config(o: ml_collections.ConfigDict, lr: optax.Schedule,
                           layout: ParamLayout | None) -> optax.GradientTransformation:
  """``optax.contrib.muon`` as a peer baseline, on the same matrices as ``muon``
  (our classification as its dimension numbers), quintic coefficients, float32."""
  mu = o.muon

  def dimension_numbers(params):
    specs = matrix_specs(params, layout and layout.logical_axes, tuple(mu.exclude))
    return jax.tree_util.tree_map_with_path(
        lambda p, _: (optax.contrib.MuonDimensionNumbers(specs[path_str(p)].fan_in, specs[path_str(p)].fan_out)
                      if specs[path_str(p)] else None), params)

  return optax.contrib.muon(
      lr, ns_steps=mu.ns_steps, beta=mu.momentum, nesterov=mu.nesterov, weight_decay=o.weight_decay,
      adam_b1=o.b1, adam_b2=o.b2, adam_weight_decay=o.weight_decay,
      adam_learning_rate=_adam_lr(o, lr), muon_weight_dimension_numbers=dimension_numbers,
      consistent_rms=mu.rms if mu.scale == "moonlight" else None)
