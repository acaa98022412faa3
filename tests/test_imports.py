"""lmjax's import graph has no cycles, counting imports inside functions too.

The graph is read statically: `ast` over every module of the package, every `import` and
`from ... import` anywhere in the file (module level, functions, classes; `if TYPE_CHECKING:`
blocks are skipped, they never run). Relative imports are resolved against the package, and
`from lmjax.x import y` is an edge to `lmjax.x.y` when `y` is a submodule, to `lmjax.x` otherwise.
Importing a submodule does run its parent packages' `__init__`, but those edges are left out: a
package `__init__` that re-exports its submodules would otherwise make every submodule that
imports a sibling `from lmjax.pkg import sibling` look like a cycle. `importlib.import_module`
with a computed name (the CLI's command table) is not seen.
"""

from __future__ import annotations

import ast
import collections
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_files(root: str, package: str) -> dict[str, str]:
  """Dotted module name -> file, for every .py file under `root/package`."""
  modules = {}
  for directory, dirs, files in os.walk(os.path.join(root, package)):
    dirs[:] = sorted(d for d in dirs if d != '__pycache__')
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      parts = os.path.relpath(os.path.join(directory, name), root)[:-3].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      modules['.'.join(parts)] = os.path.join(directory, name)
  return modules


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
      isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING')


def _import_nodes(tree: ast.AST):
  """Every Import / ImportFrom node, at any depth, outside `if TYPE_CHECKING:` bodies."""
  stack = [tree]
  while stack:
    node = stack.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      stack.extend(node.orelse)
      continue
    stack.extend(ast.iter_child_nodes(node))


def import_graph(root: str, package: str) -> dict[str, set[str]]:
  """Module -> the package's modules it imports (self-imports left out)."""
  modules = module_files(root, package)
  graph = {}
  for module, path in modules.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), filename=path)
    is_package = os.path.basename(path) == '__init__.py'
    here = module if is_package else module.rpartition('.')[0]
    targets = set()
    for node in _import_nodes(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          name = alias.name
          while name and name not in modules:  # `import lmjax.x.f` of a non-module: its parent
            name = name.rpartition('.')[0]
          if name:
            targets.add(name)
        continue
      if node.level:
        base = here.split('.')
        base = base[:len(base) - (node.level - 1)]
        source = '.'.join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ''
      for alias in node.names:
        if f'{source}.{alias.name}' in modules:
          targets.add(f'{source}.{alias.name}')
        elif source in modules:
          targets.add(source)
    targets.discard(module)
    graph[module] = targets
  return graph


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's components (iterative), each sorted; only those with more than one module."""
  index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = counter[0]
    counter[0] += 1
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      for child in children:
        if child not in index:
          index[child] = low[child] = counter[0]
          counter[0] += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
          break
        if child in on_stack:
          low[node] = min(low[node], index[child])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
              break
          if len(component) > 1:
            components.append(sorted(component))
  return components


def _shortest_path(graph, start, goal, allowed):
  previous, queue = {start: None}, collections.deque([start])
  while queue:
    node = queue.popleft()
    if node == goal:
      path = []
      while node is not None:
        path.append(node)
        node = previous[node]
      return path[::-1]
    for child in sorted(graph[node]):
      if child in allowed and child not in previous:
        previous[child] = node
        queue.append(child)
  return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """For every edge inside a cycle, the shortest cycle through it (each cycle once, starting at
  its smallest module): every import that takes part in a cycle shows up in some cycle."""
  cycles = set()
  for component in _strongly_connected(graph):
    members = set(component)
    for a in component:
      for b in sorted(graph[a] & members):
        back = _shortest_path(graph, b, a, members)
        cycle = [a] + back[:-1]
        i = cycle.index(min(cycle))
        cycles.add(tuple(cycle[i:] + cycle[:i]))
  return [list(c) + [c[0]] for c in sorted(cycles, key=lambda c: (len(c), c))]


def test_the_finder_sees_function_level_and_relative_imports(tmp_path):
  files = {
      'pkg/__init__.py': 'from pkg import sub\n',
      'pkg/a.py': 'from pkg.sub import b\nimport os\n',
      'pkg/sub/__init__.py': '',
      'pkg/sub/b.py': 'def f():\n  from .. import a\n  return a\n',
      'pkg/sub/c.py': 'from . import b\nfrom .b import f\nimport pkg.a.thing\n',
      'pkg/d.py': 'from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg import c\n',
      'pkg/c.py': 'import pkg.d\n',
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  graph = import_graph(str(tmp_path), 'pkg')
  assert graph == {'pkg': {'pkg.sub'}, 'pkg.a': {'pkg.sub.b'}, 'pkg.sub': set(),
                   'pkg.sub.b': {'pkg.a'}, 'pkg.sub.c': {'pkg.sub.b', 'pkg.a'},
                   'pkg.d': set(), 'pkg.c': {'pkg.d'}}
  assert find_cycles(graph) == [['pkg.a', 'pkg.sub.b', 'pkg.a']]


def test_lmjax_has_no_import_cycles():
  graph = import_graph(ROOT, 'lmjax')
  assert 'lmjax.train.loop' in graph and sum(map(len, graph.values())) > 50  # the walk sees lmjax
  cycles = find_cycles(graph)
  assert not cycles, f'{len(cycles)} import cycle(s):\n' + '\n'.join(
      ' -> '.join(cycle) for cycle in cycles)
