"""The import graph of ``moejax/`` has no cycles, and layers never import models.

Static (``ast``) over every module, so a cycle hidden in a function-level
import (run only when the function is called) counts as much as a
module-level one. An edge ``a -> b`` means that importing or running ``a``
may execute module ``b``: the imported module itself, plus every package
``__init__`` above it that ``a`` is not already inside (Python runs those
first: ``import moejax.models.block`` runs ``moejax/models/__init__.py``).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moejax"

def module_files() -> dict[str, tuple[pathlib.Path, bool]]:
  """{dotted module name: (file, is a package __init__)} for every module in moejax/."""
  mods = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
  return mods


def imported_modules(name: str, path: pathlib.Path, is_pkg: bool, mods) -> set[str]:
  """The moejax modules that ``name`` imports anywhere in its body (as written)."""
  package = name if is_pkg else name.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
      else:
        target = node.module or ""
      for alias in node.names:  # `from pkg import submodule` imports the submodule
        sub = f"{target}.{alias.name}"
        out.add(sub if sub in mods else target)
  return {m for m in out if m.split(".")[0] == "moejax"}


def executed_modules(name: str, imported: set[str], mods) -> set[str]:
  """What importing ``imported`` from ``name`` runs: each target and its packages ``name`` is not inside."""
  out = set()
  for target in imported:
    parts = target.split(".")
    for i in range(2, len(parts) + 1):
      ancestor = ".".join(parts[:i])
      if i < len(parts) and (name == ancestor or name.startswith(ancestor + ".")):
        continue
      if ancestor in mods and ancestor != name:
        out.add(ancestor)
  return out


def import_graph() -> dict[str, set[str]]:
  """{module: modules its imports may run}."""
  mods = module_files()
  return {name: executed_modules(name, imported_modules(name, path, is_pkg, mods), mods)
          for name, (path, is_pkg) in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  for start in sorted(graph):
    if start in state:
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif nxt not in state:
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph.get(nxt, ()))))
  return None


def test_graph_sees_known_edges():
  """The graph is not vacuous: it finds module-level, function-level and package edges."""
  graph = import_graph()
  assert "moejax.layers.attention.registry" in graph["moejax.layers.attention.dense"]
  assert "moejax.layers.moe" in graph["moejax.models.block"]
  assert "moejax.sweep.runner" in graph["moejax.sweep"]
  assert "moejax.train" in graph["moejax.cli"]  # imported inside a function


def test_find_cycle_reports_the_path():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_never_import_models():
  mods = module_files()
  bad = {name: sorted(m for m in imported_modules(name, path, is_pkg, mods) if m.split(".")[:2] == ["moejax", "models"])
         for name, (path, is_pkg) in mods.items() if name.split(".")[:2] == ["moejax", "layers"]}
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, f"layers import models: {bad}"


def test_config_schema_imports_nothing_from_moejax():
  """The schema can be imported from anywhere (validation lives above the registries, moejax/validation.py)."""
  mods = module_files()
  path, is_pkg = mods["moejax.config"]
  imported = imported_modules("moejax.config", path, is_pkg, mods)
  assert not imported, f"moejax.config imports {sorted(imported)}"
