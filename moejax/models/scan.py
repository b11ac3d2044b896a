"""Scanning repeated layers (``model.scan_layers``): one traced and compiled body for many layers.

Unrolled, a model of L blocks is traced L times and XLA compiles L copies of
the block; tracing and compile time grow with depth (a 43-layer DeepSeek-V4-
Flash step took over 15 minutes to trace on a 2-core machine). With
``model.scan_layers`` the per-layer schedule is split by :func:`scan_plan` into

    layer_0 .. layer_{prefix-1}          unrolled (e.g. V4's hash-routed layers)
    scanned: block_0 .. block_{period-1}  a ``period`` of blocks, run ``repeats``
                                          times by ``nn.scan``; every variable
                                          gets a leading [repeats] axis
                                          (logical axis ``layers``)
    layer_{...} ..                        the rest, unrolled

choosing the split that scans the most layers (then the shortest period). The
scanned model computes what the unrolled one does: the blocks, their order and
their parameters are the same, stored stacked. :func:`stack` and :func:`unstack`
(one collection) and :func:`stack_collections` / :func:`unstack_collections`
(a dict of collections) convert between the two layouts
(``tests/models/test_scan.py`` checks logits, gradients, train steps and
optimizer updates against the unrolled model).

Outside the model, the stacked layout shows in the parameters, the optimizer
state, checkpoints and the optimizer's own per-module diagnostics
(``scanned/ns_error``). What layers sow (losses, router loads, metrics, max
logits, captured router outputs) is unstacked right after the forward pass
(``moejax/objective.py``); the train step unstacks the model state around its
update and the updates for ``layer_i/update_rms`` (``moejax/step.py``), so those
keep their per-layer ``layer_i`` names.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.config import expand_schedule
from moejax.models.block import Block, block_class

SCANNED = "scanned"   # the module (and top-level variable key) holding the stacked blocks
LAYERS_AXIS = "layers"  # logical axis name of the stacked dimension (never sharded)
MAX_PERIOD = 4


class ScanPlan(NamedTuple):
  """Layers ``prefix .. prefix + period * repeats - 1`` are scanned; the others are unrolled."""

  prefix: int
  period: int
  repeats: int
  num_layers: int

  @property
  def scanned_end(self) -> int:
    return self.prefix + self.period * self.repeats

  def layer_of(self, repeat: int, block: int) -> int:
    """The unrolled index of block ``block`` of repeat ``repeat``."""
    return self.prefix + repeat * self.period + block


def layer_kinds(model_cfg) -> list[tuple[str, str, str]]:
  """Per layer: (attention type, MLP type, remat policy)."""
  n = model_cfg.num_layers
  return list(zip(expand_schedule(model_cfg.attention_types, n), expand_schedule(model_cfg.mlp_types, n),
                  expand_schedule(model_cfg.remat, n)))


def scan_plan(model_cfg) -> ScanPlan | None:
  """The split of ``model_cfg``'s schedule that scans the most layers (at least 2 repeats of a period of
  at most :data:`MAX_PERIOD` identical-kind layers), shortest period first; None if none repeats."""
  kinds = layer_kinds(model_cfg)
  n, best = len(kinds), None
  for period in range(1, MAX_PERIOD + 1):
    for prefix in range(n):
      repeats = 0
      while prefix + (repeats + 1) * period <= n and \
          kinds[prefix + repeats * period:prefix + (repeats + 1) * period] == kinds[prefix:prefix + period]:
        repeats += 1
      if repeats >= 2 and (best is None or period * repeats > best.period * best.repeats):
        best = ScanPlan(prefix, period, repeats, n)
  return best


def plan_of(model_cfg) -> ScanPlan | None:
  """The plan the model uses: None when ``model.scan_layers`` is off (or nothing repeats)."""
  return scan_plan(model_cfg) if model_cfg.get("scan_layers", False) else None


def unrolled(model_cfg) -> ml_collections.ConfigDict:
  """A copy of ``model_cfg`` with ``scan_layers`` off (the layout interop and FLOP counting read)."""
  frozen = isinstance(model_cfg, ml_collections.FrozenConfigDict)
  cfg = model_cfg.as_configdict() if frozen else model_cfg.copy_and_resolve_references()
  cfg.scan_layers = False
  return ml_collections.FrozenConfigDict(cfg) if frozen else cfg


class Period(nn.Module):
  """``period`` consecutive blocks: the body of the scan. (h, positions, segment ids, token ids) -> (h, None)."""

  cfg: ml_collections.FrozenConfigDict
  kinds: tuple[tuple[str, str, str], ...]
  decode_len: int = 0

  @nn.compact
  def __call__(self, h, positions_BxT, segment_ids_BxT, token_ids_BxT):
    for j, (attention_type, mlp_type, remat) in enumerate(self.kinds):
      block = Block if self.decode_len else block_class(remat)
      h = block(self.cfg, attention_type, mlp_type, name=f"block_{j}")(
          h, positions_BxT, segment_ids_BxT, token_ids_BxT, self.decode_len)
    return h, None


def scanned_blocks(cfg, plan: ScanPlan, decode_len: int) -> nn.Module:
  """The ``nn.scan`` of :class:`Period` over ``plan.repeats``, named :data:`SCANNED`: every variable
  collection (parameters, router state, caches, what is sown) is stacked on a leading axis."""
  kinds = tuple(layer_kinds(cfg)[plan.prefix:plan.prefix + plan.period])
  scan = nn.scan(Period, variable_axes={True: 0}, split_rngs={"params": True}, in_axes=(nn.broadcast,) * 3,
                 length=plan.repeats, metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
  return scan(cfg, kinds, decode_len, name=SCANNED)


# ----------------------------------------------------------------------------- layouts

def stack(tree: dict, plan: ScanPlan | None) -> dict:
  """One unrolled variable collection ({"layer_i": ...}) -> the scanned layout of ``plan`` (unchanged
  when ``plan`` is None); :func:`stack_collections` for all collections."""
  if plan is None:
    return tree
  out = {k: v for k, v in tree.items() if not _scanned_layer(k, plan)}
  blocks = {}
  for j in range(plan.period):
    layers = [tree.get(f"layer_{plan.layer_of(r, j)}") for r in range(plan.repeats)]
    if any(layer is not None for layer in layers):
      blocks[f"block_{j}"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  if blocks:
    out[SCANNED] = blocks
  return out


def stack_collections(variables: dict, plan: ScanPlan | None) -> dict:
  """:func:`stack` of every collection of ``variables`` ({"params": ..., "router_bias": ...})."""
  return {name: stack(tree, plan) for name, tree in variables.items()}


def unstack_collections(variables: dict, plan: ScanPlan | None) -> dict:
  """:func:`unstack` of every collection of ``variables``."""
  return {name: unstack(tree, plan) for name, tree in variables.items()}


def unstack(tree: dict, plan: ScanPlan | None) -> dict:
  """The inverse of :func:`stack`: {"scanned": {"block_j": [repeats, ...]}} -> {"layer_i": ...}."""
  if plan is None or not isinstance(tree, dict):
    return tree
  out = {k: v for k, v in tree.items() if k != SCANNED}
  for block, subtree in tree.get(SCANNED, {}).items():
    j = int(block.removeprefix("block_"))
    for r in range(plan.repeats):
      out[f"layer_{plan.layer_of(r, j)}"] = jax.tree.map(lambda x, r=r: x[r], subtree)
  return dict(sorted(out.items(), key=lambda kv: _layer_order(kv[0])))


def _scanned_layer(key: str, plan: ScanPlan) -> bool:
  return key.startswith("layer_") and plan.prefix <= int(key.removeprefix("layer_")) < plan.scanned_end


def _layer_order(key: str):
  return (0, int(key.removeprefix("layer_")), "") if key.startswith("layer_") else (1, 0, key)
