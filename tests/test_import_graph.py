"""The package import graph of jtransfer/ has no cycle, function-level imports included.

A cycle that only a function-level import closes still couples two modules both ways (each
needs the other to be importable) and is the usual sign of a missing seam; the layering in
jtransfer/__init__.py says imports point down only.
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jtransfer")


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every .py file under jtransfer/."""
  out = {}
  base = os.path.dirname(ROOT)
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), base)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(d, f)
  return out


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
  """The jtransfer modules one import statement reaches (a name bound from a package is the
  submodule when there is one, else the package itself)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names if a.name in known]
  if node.level:  # relative: resolve against this module's package
    parts = module.split(".")
    parts = parts if is_package else parts[:-1]
    parts = parts[:len(parts) - node.level + 1]
    base = ".".join(parts + ([node.module] if node.module else []))
  else:
    base = node.module or ""
  if base not in known:
    return []
  out = []
  for a in node.names:
    sub = f"{base}.{a.name}"
    out.append(sub if sub in known else base)
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the jtransfer modules it imports anywhere in its body (self-edges dropped)."""
  mods = _modules()
  known = set(mods)
  graph = {}
  for name, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges.update(_targets(node, name, is_package, known))
    graph[name] = edges - {name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
  state = {n: 0 for n in graph}  # 0 unseen, 1 on the stack, 2 done
  for root in sorted(graph):
    if state[root]:
      continue
    stack = [(root, iter(sorted(graph[root])))]
    path = [root]
    state[root] = 1
    while stack:
      node, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        state[node] = 2
        stack.pop()
        path.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif state.get(nxt) == 0:
        state[nxt] = 1
        stack.append((nxt, iter(sorted(graph[nxt]))))
        path.append(nxt)
  return None


def test_finder_sees_a_cycle_and_a_dag():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_reads_function_level_and_relative_imports(tmp_path):
  known = {"p", "p.a", "p.b"}
  tree = ast.parse("def f():\n  from . import b\n  from p.a import X\n")
  found = [t for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
           for t in _targets(n, "p.a", False, known)]
  assert sorted(found) == ["p.a", "p.b"]


def test_graph_is_not_empty():
  graph = import_graph()
  assert "jtransfer.methods.transfer" in graph["jtransfer.methods.delta"]


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  if cycle:
    pytest.fail("import cycle: " + " -> ".join(cycle))


def test_methods_keep_no_global_configuration():
  """No `global` statement in jtransfer/methods: configuration travels as typed knobs
  (e.g. DELTA's `Config` into `Strategy.build`), never as a module variable rebound at run
  time."""
  methods = os.path.join(ROOT, "methods")
  found = []
  for f in sorted(os.listdir(methods)):
    if f.endswith(".py"):
      with open(os.path.join(methods, f)) as fh:
        tree = ast.parse(fh.read())
      found += [f"{f}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
  assert not found, f"global statements in jtransfer/methods: {found}"
