"""Name -> implementation registries for the things researchers swap.

Attention types, MLP types, routers, data sources and optimizers are each a
``Registry``. A new variant is one module plus one decorator line::

    from moejax.layers.attention import ATTENTION

    @ATTENTION.register("my_attention")
    class MyAttention(nn.Module):
        ...

and is then selected by name from the config (``model.attention_types``).
Config validation asks the registry for the known names, so a typo fails
before anything compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named table of implementations (classes or factories)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: ``@REGISTRY.register("name")`` adds the decorated object."""

    def add(obj: T) -> T:
      if name in self._entries and not _same_definition(self._entries[name], obj):
        raise ValueError(f"{self.kind} {name!r} is already registered "
                         f"({self._entries[name]!r}); pick another name.")
      self._entries[name] = obj
      return obj

    return add

  def get(self, name: str) -> T:
    try:
      return self._entries[name]
    except KeyError:
      raise KeyError(f"unknown {self.kind} {name!r}; known: "
                     f"{', '.join(sorted(self._entries))}") from None

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: Any) -> bool:
    return name in self._entries


def _same_definition(old: Any, new: Any) -> bool:
  """The same object, or the same definition executed again (a notebook cell
  or a config file that defines a router, run twice): the new one replaces it."""
  if old is new:
    return True
  key = lambda o: (getattr(o, "__module__", None), getattr(o, "__qualname__", None))
  return key(old)[1] is not None and key(old) == key(new)
