"""Name -> implementation registries for the things researchers swap.

Attention types, MLP types, routers, data sources and optimizers are each a
``Registry``. A new variant is one module plus one decorator line::

    from moejax.layers.attention.registry import ATTENTION

    @ATTENTION.register("my_attention")
    class MyAttention(nn.Module):
      windowed: ClassVar[bool] = True   # a capability (see the registry's list)
        ...

and is then selected by name from the config (``model.attention_types``).

Entries describe themselves. Each registry lists the *capabilities* its
entries may declare, with defaults (e.g. attention types: ``windowed``,
``qk_clip_params``, ...). An entry declares one as a class attribute (the
router / attention / MLP modules) or as a keyword of ``register`` (factories
and functions: ``@OPTIMIZERS.register("muon", section="muon", ...)``).
One capability every registry has, ``validate_config``, is a function
``(cfg) -> list[str]`` of error messages for the config fields the entry
reads; ``moejax/validation.py`` runs those of the entries in use, so a user
entry is checked on equal terms with the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A named table of implementations (classes or factories) and their declared capabilities."""

  def __init__(self, kind: str, capabilities: dict[str, Any] | None = None):
    self.kind = kind
    self.capabilities = {"validate_config": None, **(capabilities or {})}
    self._entries: dict[str, T] = {}
    self._declared: dict[str, dict[str, Any]] = {}

  def register(self, name: str, **capabilities: Any) -> Callable[[T], T]:
    """Decorator: ``@REGISTRY.register("name", **capabilities)`` adds the decorated object."""
    unknown = sorted(set(capabilities) - set(self.capabilities))
    if unknown:
      raise TypeError(f"{self.kind} {name!r}: unknown capabilities {unknown}; known: {sorted(self.capabilities)}.")

    def add(obj: T) -> T:
      if name in self._entries and not _same_definition(self._entries[name], obj):
        raise ValueError(f"{self.kind} {name!r} is already registered "
                         f"({self._entries[name]!r}); pick another name.")
      self._entries[name] = obj
      self._declared[name] = capabilities
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

  def capability(self, name: str, key: str) -> Any:
    """What entry ``name`` declares for ``key``: at ``register``, else as an attribute, else the default."""
    if key not in self.capabilities:
      raise KeyError(f"{self.kind}s have no capability {key!r}; known: {sorted(self.capabilities)}.")
    if key in self._declared.get(name, {}):
      return self._declared[name][key]
    return getattr(self.get(name), key, self.capabilities[key])

  def having(self, names: Iterable[str], key: str) -> list[str]:
    """The known ``names`` whose capability ``key`` is set (truthy), sorted."""
    return sorted(n for n in set(names) if n in self and self.capability(n, key))

  def checks(self, names: Iterable[str]) -> list[Callable[[Any], list[str]]]:
    """The distinct ``validate_config`` functions of the known ``names`` (a check shared by
    several entries, e.g. inherited, runs once)."""
    found: list[Callable[[Any], list[str]]] = []
    for n in sorted(set(names)):
      check = self.capability(n, "validate_config") if n in self else None
      if check is not None and check not in found:
        found.append(check)
    return found

  def __contains__(self, name: Any) -> bool:
    return name in self._entries


def _same_definition(old: Any, new: Any) -> bool:
  """The same object, or the same definition executed again (a notebook cell
  or a config file that defines a router, run twice): the new one replaces it."""
  if old is new:
    return True
  key = lambda o: (getattr(o, "__module__", None), getattr(o, "__qualname__", None))
  return key(old)[1] is not None and key(old) == key(new)
