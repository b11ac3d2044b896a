"""Parameter-tree paths as strings: the one spelling every module uses.

A leaf of ``{"layer_0": {"attention": {"w_q": x}}}`` is named
``"layer_0/attention/w_q"``: dict keys and sequence indices joined by ``/``;
box and NamedTuple fields are skipped, so a boxed tree (``nn.Partitioned``)
and its unboxed values give the same names. The optimizers, the trainer's
metrics and QK-clip match parameters by these names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def path_str(path, fields: bool = False) -> str:
  """'layer_0/attention/w_q' from a jax key path.

  ``fields=True`` also names attribute keys (NamedTuple fields, dataclass
  attributes) and flattened-index keys: one name per level, for structures
  that are not plain dicts (a whole train state).
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif fields:
      parts.append(str(getattr(key, "name", getattr(key, "key", key))))
  return "/".join(parts)


def flatten(tree, is_leaf: Callable[[Any], bool] | None = None, fields: bool = False) -> dict[str, Any]:
  """{path: leaf} for every leaf of ``tree`` (see :func:`path_str`)."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {path_str(p, fields): leaf for p, leaf in flat}


def by_path(tree) -> dict[str, Any]:
  """{path: leaf} of a tree whose leaves are tuples (axis names, PartitionSpecs) or None.

  A flat dict keyed by path ("layer_0/mlp/w_up") gives the same table.
  """
  if tree is None:
    return {}
  return flatten(tree, is_leaf=lambda x: x is None or isinstance(x, tuple))


def layer_name(path: str) -> str:
  """Diagnostics are per top-level module: 'layer_3/mlp/w_up' -> 'layer_3'."""
  return path.split("/")[0]
