"""The package's shape: imports flow one way (no cycle between modules), the inference tools
never import training, and no function is longer than a screen (80 lines)."""

import ast
import os

PACKAGE = "ecdit_jax"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 80
INFERENCE_TOOLS = ("sample", "evaluate", "export", "analyze_routing", "precompute")


def _modules() -> dict[str, str]:
  modules = {}
  for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        modules[module.removesuffix(".__init__")] = path
  return modules


def _imports(tree: ast.AST, modules: dict[str, str]) -> set[str]:
  """The package's modules a module imports, anywhere in it. ``from pkg import sub`` depends
  on the submodule ``pkg.sub``, other names on the module they come from."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module in modules:
      submodules = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
      found.update(submodules)
      if len(submodules) < len(node.names):
        found.add(node.module)
  return found


def _graph():
  modules = _modules()
  trees = {m: ast.parse(open(p, encoding="utf-8").read()) for m, p in modules.items()}
  return {m: _imports(tree, modules) - {m} for m, tree in trees.items()}, trees


def _cycle(graph):
  state, path = {}, []

  def visit(module):
    state[module] = "open"
    path.append(module)
    for dep in sorted(graph[module]):
      if state.get(dep) == "open":
        return path[path.index(dep):] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    state[module] = "done"
    path.pop()
    return None

  for module in sorted(graph):
    if module not in state and (found := visit(module)):
      return found
  return None


def test_no_import_cycle_between_modules():
  graph, _ = _graph()
  assert _cycle(graph) is None


def test_the_inference_tools_never_import_training():
  graph, _ = _graph()

  def reachable(module, seen):
    for dep in graph[module] - seen:
      seen.add(dep)
      reachable(dep, seen)
    return seen

  for tool in INFERENCE_TOOLS:
    training = sorted(m for m in reachable(f"{PACKAGE}.{tool}", set())
                      if m.startswith(f"{PACKAGE}.train"))
    assert not training, (tool, training)


def test_no_function_is_longer_than_a_screen():
  _, trees = _graph()
  long = [(module, node.name, node.end_lineno - node.lineno + 1)
          for module, tree in trees.items() for node in ast.walk(tree)
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long


def test_the_checks_see_what_they_check():
  graph, trees = _graph()
  assert len(graph) > 50 and f"{PACKAGE}.train.loop" in graph
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert f"{PACKAGE}.model.routing" in graph[f"{PACKAGE}.model.moe"]
