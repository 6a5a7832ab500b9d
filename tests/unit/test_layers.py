"""The package's layers: imports go only downward, and no module imports itself back.

`xft_megatron.LAYERS` is the one list of layers, bottom first. Every import in `xft_megatron/`,
`benchmarks/` and `tools/` is read from the source (ast, nothing is imported): module-level and
inside functions, under `if TYPE_CHECKING:` too, relative ones resolved, `from pkg import mod`
taken as an import of the submodule `pkg.mod`, `__import__("m")` and
`importlib.import_module("m")` with a literal name as imports of `m`. Two rules:

  * a module of one layer imports only from its own layer or lower ones; the package root
    (`xft_megatron/__init__.py`) imports nothing of the package, and the package imports nothing
    of `benchmarks`, `tools` or `tests` (a layer above the package's top, `cli`);
  * no cycle among modules, whatever the layers.

A violation is reported as `file:line: importer -> imported (why)`, every edge of a cycle so.
"""

import ast
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "xft_megatron"
ABOVE = ("benchmarks", "tools")  # folders of modules above the package: read, checked for cycles
OUTSIDE = ("tests",)  # imported by nothing of the package; its files are not read


class Edge(NamedTuple):
    importer: str
    imported: str
    path: str  # the importer's file, relative to the root
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} -> {self.imported}"


def read_layers(root: str, package: str = PACKAGE) -> Tuple[str, ...]:
    """The `LAYERS` tuple of the package's `__init__.py`, read without importing it."""
    path = os.path.join(root, package, "__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "LAYERS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{path}: no LAYERS = (...) assignment")


def find_modules(root: str, folders: Sequence[str]) -> Dict[str, str]:
    """Dotted module name -> file path (relative to root) of every .py under the folders."""
    modules = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                parts = rel[:-len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = rel
    return modules


def _is_dynamic_import(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id in ("__import__", "import_module")) or \
        (isinstance(func, ast.Attribute) and func.attr == "import_module")


def imports_of(module: str, path: str, root: str, modules: Dict[str, str],
               internal: Sequence[str]) -> List[Edge]:
    """Every import of the given module's file that names a module under `internal`."""
    full = os.path.join(root, path)
    with open(full, encoding="utf-8") as f:
        tree = ast.parse(f.read(), full)
    is_package = os.path.basename(path) == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    edges = []

    def add(target: str, line: int) -> None:
        if target.split(".")[0] in internal:
            edges.append(Edge(module, target, path, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _is_dynamic_import(node.func):
            add(node.args[0].value, node.lineno)  # __import__("m"), importlib.import_module("m")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[:len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node.lineno)
    return edges


def collect(root: str, package: str = PACKAGE, above: Sequence[str] = ABOVE,
            outside: Sequence[str] = OUTSIDE) -> Tuple[Dict[str, str], List[Edge]]:
    """The modules (name -> file) and every import edge among them."""
    modules = find_modules(root, (package,) + tuple(above))
    internal = (package,) + tuple(above) + tuple(outside)
    edges = []
    for module, path in sorted(modules.items()):
        edges.extend(imports_of(module, path, root, modules, internal))
    return modules, edges


def rank(module: str, layers: Sequence[str], package: str = PACKAGE) -> Optional[int]:
    """The layer index of a module: -1 for the package root, len(layers) for anything above the
    package; None for a module of the package in no layer."""
    parts = module.split(".")
    if parts[0] != package:
        return len(layers)
    if len(parts) == 1:
        return -1
    return layers.index(parts[1]) if parts[1] in layers else None


def layer_violations(modules: Dict[str, str], edges: Sequence[Edge], layers: Sequence[str],
                     package: str = PACKAGE, above: Sequence[str] = ABOVE) -> List[str]:
    """`file:line: a -> b (why)` for each import of a higher layer, of a module in no layer,
    or of a module that does not exist (among those read)."""
    problems = []
    for module in sorted(modules):
        if module.split(".")[0] == package and rank(module, layers, package) is None:
            problems.append(f"{modules[module]}: {module} is in no layer of "
                            f"{package}.LAYERS")
    for e in edges:
        if e.imported not in modules and e.imported.split(".")[0] in (package, *above):
            problems.append(f"{e} (no such module)")
            continue
        low, high = rank(e.importer, layers, package), rank(e.imported, layers, package)
        if low is None or high is None:
            continue
        if high > low:
            def name(r: int) -> str:
                return "the package root" if r < 0 else (
                    layers[r] if r < len(layers) else "above the package")
            problems.append(f"{e} (layer {name(low)} imports the higher layer {name(high)})")
    return problems


def cycles(edges: Sequence[Edge]) -> List[Tuple[List[str], List[Edge]]]:
    """Each strongly connected group of modules (those that reach each other through imports)
    with one of its cycles (its edges, in order)."""
    graph: Dict[str, Dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.importer, {}).setdefault(e.imported, e)
    # Tarjan's strongly connected components, iterative
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    groups: List[List[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1 or node in graph.get(node, {}):
                        groups.append(sorted(group))
    found = []
    for group in groups:
        members = set(group)
        start = group[0]
        # shortest path start -> ... -> start inside the group (breadth first)
        previous: Dict[str, Edge] = {}
        frontier = [start]
        done = False
        while frontier and not done:
            following = []
            for node in frontier:
                for child, e in sorted(graph.get(node, {}).items()):
                    if child not in members or child in previous:
                        continue
                    previous[child] = e
                    if child == start:
                        done = True
                        break
                    following.append(child)
                if done:
                    break
            frontier = following
        path, node = [], start
        while True:
            e = previous[node]
            path.append(e)
            node = e.importer
            if node == start:
                break
        found.append((group, path[::-1]))
    return found


def check(root: str, package: str = PACKAGE, above: Sequence[str] = ABOVE,
          outside: Sequence[str] = OUTSIDE) -> List[str]:
    """Every violation of the two rules, as lines to print."""
    layers = read_layers(root, package)
    modules, edges = collect(root, package, above, outside)
    problems = layer_violations(modules, edges, layers, package, above)
    for group, cycle in cycles(edges):
        names = [e.importer for e in cycle] + [cycle[0].importer]
        problems.append("cycle: " + " -> ".join(names))
        problems.extend(f"  {e}" for e in cycle)
        if len(group) > len(cycle):
            problems.append(f"  (one of the cycles among {len(group)} modules: "
                            f"{', '.join(group)})")
    return problems


def test_imports_go_only_downward_and_never_in_a_cycle():
    problems = check(REPO)
    assert not problems, "layer rule broken (see xft_megatron/__init__.py):\n" + \
        "\n".join(problems)


def test_the_checker_reports_an_upward_import_and_a_cycle(tmp_path):
    """The checker on a small package of its own: one upward import, one cycle (through a
    function-level import and one under TYPE_CHECKING), each reported with file and line; and
    an import of a module that does not exist."""
    files = {
        "pkg/__init__.py": 'LAYERS = ("low", "high")\n',
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "import os\n\n\ndef f():\n    from pkg.high import b  # upward\n",
        "pkg/low/c.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                        "    from . import d\n",
        "pkg/low/d.py": "\n\ndef g():\n    from pkg.low.c import x\n",
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from ..low import a  # fine: downward\n",
        "tools/t.py": "import pkg.high.b\nimport pkg.gone\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    problems = check(str(tmp_path), "pkg", above=("tools",), outside=())
    upward = os.path.join("pkg", "low", "a.py") + ":5: pkg.low.a -> pkg.high.b"
    assert any(p.startswith(upward) and "higher layer high" in p for p in problems), problems
    c_to_d = os.path.join("pkg", "low", "c.py") + ":4: pkg.low.c -> pkg.low.d"
    d_to_c = os.path.join("pkg", "low", "d.py") + ":4: pkg.low.d -> pkg.low.c"
    assert any(p.strip() == c_to_d for p in problems), problems
    assert any(p.strip() == d_to_c for p in problems), problems
    # the upward edge also closes a cycle a -> b -> a, reported with both lines
    b_to_a = os.path.join("pkg", "high", "b.py") + ":1: pkg.high.b -> pkg.low.a"
    assert any(p.strip() == b_to_a for p in problems), problems
    assert sum(p.startswith("cycle:") for p in problems) == 2, problems
    gone = os.path.join("tools", "t.py") + ":2: tools.t -> pkg.gone (no such module)"
    assert gone in problems, problems


if __name__ == "__main__":
    print("\n".join(check(REPO)) or "no violations")
