"""One way to apply saved or partial settings onto the config schema.

:func:`apply_config` copies a nested dict (a saved ``config.json``, an HF
mapping's ``model.*`` updates) or dotted-key overrides (``{"optim.b2": 0.95}``,
sweep arms) onto a ``ConfigDict`` that already holds every field::

    cfg = base_config()
    apply_config(cfg, json.load(open("workdir/config.json")))
    apply_config(cfg, {"model.num_layers": 2, "optim": {"name": "muon"}})

Rules, the same everywhere: a key the schema does not have raises
:class:`~moejax.config.ConfigError` naming it and the close matches; values are
coerced like ml_collections overrides (an int into a float field; a value of
another type is an error naming the field); a JSON list becomes a tuple where
the schema holds a tuple; a section that is empty in the schema (such as
``distill.domains``) is a free mapping and takes its entries as given.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from typing import Any

import ml_collections

from moejax.config import ConfigError


def apply_config(cfg: ml_collections.ConfigDict, updates: Mapping[str, Any], prefix: str = "",
                 source: str = "") -> ml_collections.ConfigDict:
  """Sets every field of ``updates`` (nested and/or dotted keys) on ``cfg`` in place; returns ``cfg``.

  ``prefix``: the dotted name of ``cfg`` itself in messages (``"model"`` when
  ``cfg`` is the model section); ``source``: where the values come from (a
  file), put in front of every error message.
  """
  try:
    for key, value in updates.items():
      *sections, name = str(key).split(".")
      node, path = cfg, prefix
      for section in sections:
        _check_known(node, section, path)
        if not isinstance(node[section], ml_collections.ConfigDict):
          raise ConfigError(f"{_join(path, section)} is a field, not a section: {key!r} cannot set a field in it.")
        node, path = node[section], _join(path, section)
      _set(node, name, value, path)
  except ConfigError as err:
    raise ConfigError(f"{source}: {err}" if source else str(err)) from None
  return cfg


def _join(path: str, name: str) -> str:
  return f"{path}.{name}" if path else name


@functools.cache
def free_mappings() -> frozenset[str]:
  """Dotted paths of the sections that are empty in the schema (``distill.domains``): free mappings."""
  from moejax.config import base_config

  found = set()

  def walk(node: ml_collections.ConfigDict, path: str) -> None:
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict) and not len(value):
        found.add(_join(path, key))
      elif isinstance(value, ml_collections.ConfigDict):
        walk(value, _join(path, key))

  walk(base_config(), "")
  return frozenset(found)


def _set(node: ml_collections.ConfigDict, name: str, value: Any, path: str) -> None:
  # A free mapping takes new entries as given; decided by the schema, not by what the node holds now
  # (after its first entry the node is no longer empty).
  if path in free_mappings() and name not in node:
    node[name] = ml_collections.ConfigDict(_tuples(value)) if isinstance(value, Mapping) else _tuples(value)
    return
  _check_known(node, name, path)
  current = node[name]
  if isinstance(current, ml_collections.ConfigDict) and isinstance(value, Mapping):
    apply_config(current, value, _join(path, name))
    return
  if isinstance(current, tuple) and isinstance(value, list):
    value = _tuples(value)
  try:
    node[name] = value
  except (TypeError, ValueError) as err:
    kind = "a section" if isinstance(current, ml_collections.ConfigDict) else type(current).__name__
    raise ConfigError(f"{_join(path, name)}={value!r} has the wrong type: the schema holds {kind} "
                      f"(now {current!r}); give a value of that type. ({err})") from None


def _check_known(node: ml_collections.ConfigDict, name: str, path: str) -> None:
  if name in node:
    return
  known = sorted(node.keys())
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
  hint = f"did you mean {' or '.join(_join(path, c) for c in close)}? " if close else ""
  where = f"fields of {path}" if path else "sections"
  raise ConfigError(f"{_join(path, name)} is not a config field; {hint}({where}: {', '.join(known)}; "
                    "the schema is moejax/config.py).")


def _tuples(value: Any) -> Any:
  """JSON lists -> tuples, all the way down (the schema stores sequences as tuples)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, Mapping):
    return {k: _tuples(v) for k, v in value.items()}
  return value
