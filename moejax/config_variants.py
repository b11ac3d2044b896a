"""One grammar for config variants: ``configs/file.py:key=value,flag,word``.

The text after ``:`` in ``--config configs/x.py:ARG`` reaches ``get_config(ARG)``;
every file in ``configs/`` reads it with :func:`parse_arg` (big_vision's
``configs/common.py:parse_arg``), declaring its options with their defaults::

    def get_config(arg=None):
      a = parse_arg(arg, data=one_of("stdlib", "copy", "passkey"), t=1024, reverse=False)
      ...  a.data, a.t, a.reverse

Comma-separated items, each one of:

* ``key=value``: the option ``key``, converted to its default's type (int,
  float, str; bool from ``true/false/1/0/yes/no``), e.g. ``t=262144``;
* ``flag``: a bool option set to True, e.g. ``reverse``;
* ``word``: a value of the one :func:`one_of` option that allows it, e.g.
  ``copy`` for ``data=one_of("stdlib", "copy")`` (each such option at most once).

Anything else raises :class:`~moejax.config.ConfigError` naming the item and the
known options and values.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from moejax.config import ConfigError

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class one_of(tuple):  # noqa: N801  (reads as a declaration: data=one_of("a", "b"))
  """The allowed values of an option; its default is ``default``, else the first."""

  def __new__(cls, *values: str, default: str | None = None):
    self = super().__new__(cls, values)
    self.default = values[0] if default is None else default
    if self.default not in values:
      raise ValueError(f"one_of{values}: default {self.default!r} is not one of the values")
    return self


def parse_arg(arg: str | None, **options: Any) -> ml_collections.ConfigDict:
  """The options of a config variant string (see the module docstring), defaults filled in."""
  out = ml_collections.ConfigDict({k: v.default if isinstance(v, one_of) else v for k, v in options.items()})
  given: set[str] = set()
  for item in (i.strip() for i in (arg or "").split(",")):
    if not item:
      continue
    key, eq, text = item.partition("=")
    if eq:
      key = key.strip()
      if key not in options:
        raise ConfigError(f"config variant {item!r}: unknown option {key!r}; {_known(options)}.")
      out[key] = _convert(key, text.strip(), options[key])
    elif isinstance(options.get(item), bool):
      key, out[item] = item, True
    else:
      owners = [k for k, v in options.items() if isinstance(v, one_of) and item in v]
      if not owners:
        raise ConfigError(f"config variant {item!r} is neither an option value nor a flag; {_known(options)}.")
      if len(owners) > 1:
        raise ConfigError(f"config variant {item!r} is a value of several options {owners}; write "
                          f"{owners[0]}={item}.")
      key, out[owners[0]] = owners[0], item
    if key in given:
      raise ConfigError(f"config variant {arg!r} sets {key!r} twice; give each option at most once.")
    given.add(key)
  return out


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, one_of):
    if text not in default:
      raise ConfigError(f"config variant {key}={text!r}: {key} is one of {', '.join(default)}.")
    return text
  if isinstance(default, bool):
    if text.lower() not in _TRUE + _FALSE:
      raise ConfigError(f"config variant {key}={text!r}: {key} is a flag; give true or false.")
    return text.lower() in _TRUE
  try:
    return type(default)(text)
  except ValueError:
    raise ConfigError(f"config variant {key}={text!r}: {key} must be of type {type(default).__name__} "
                      f"(default {default!r}).") from None


def _known(options: dict[str, Any]) -> str:
  if not options:
    return "this config takes no variant"
  parts = []
  for k, v in options.items():
    if isinstance(v, one_of):
      parts.append(f"{k}: one of {', '.join(v)} (default {v.default})")
    elif isinstance(v, bool):
      parts.append(f"flag {k}")
    else:
      parts.append(f"{k}=<{type(v).__name__}> (default {v!r})")
  return "known: " + "; ".join(parts)
