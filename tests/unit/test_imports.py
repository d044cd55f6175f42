"""The import graph of shelltrain/: imports point one way (no cycle), and a module names the shelltrain modules it
depends on at its top, where a reader (and this test) sees them.

Every `import` counts, at module level and inside functions alike: a function-level import that closes a circle is
still a circle, only one that fails later and less clearly. Imports under `if TYPE_CHECKING:` count too: the layer
they reach is still one the module depends on.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "shelltrain"
ROOT = PACKAGE.name


@dataclass(frozen=True)
class Edge:
    """One import of a shelltrain module by another, and where it is written."""

    source: str
    target: str
    path: str
    line: int
    in_function: bool
    type_checking: bool

    def where(self) -> str:
        """file:line, and whether the import runs only inside a function or only for type checkers."""
        notes = [f"{self.path}:{self.line}"]
        if self.in_function:
            notes.append("in a function")
        if self.type_checking:
            notes.append("TYPE_CHECKING")
        return ", ".join(notes)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The shelltrain modules an import statement loads: `from shelltrain.x import y` is module shelltrain.x.y when
    that is a module, else shelltrain.x."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in MODULES]
    base = node.module or ""
    if node.level:  # relative: from the importer's package upwards
        package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    if len(found) < len(node.names) and base in MODULES:
        found.append(base)
    return found


def function_nodes(tree: ast.AST) -> set[int]:
    """The ids of every node inside a function body (methods and nested functions included)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """The ids of every node under an `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) block."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            inside.update(id(child) for statement in node.body for child in ast.walk(statement))
    return inside


def import_edges() -> list[Edge]:
    """Every import of a shelltrain module inside shelltrain/, one edge per imported module."""
    edges = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        inside, typing_only = function_nodes(tree), type_checking_nodes(tree)
        relative = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in resolve(node, name):
                if target != name:
                    edge = Edge(name, target, relative, node.lineno, id(node) in inside, id(node) in typing_only)
                    edges.append(edge)
    return edges


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module: each is at least one cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], edges: list[Edge]) -> str:
    """A cycle's modules and the imports that join them, each with its file and line."""
    members = set(component)
    inner = sorted(
        (e for e in edges if e.source in members and e.target in members), key=lambda e: (e.source, e.target)
    )
    lines = [f"{e.source} -> {e.target} ({e.where()})" for e in inner]
    return " <-> ".join(component) + ":\n    " + "\n    ".join(lines)


def test_the_graph_sees_the_package():
    edges = import_edges()
    assert len(MODULES) > 10, f"only {len(MODULES)} modules under {PACKAGE}"
    assert any(e.source == f"{ROOT}.cli" for e in edges), "no import of cli.py was found: the parser misses imports"


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_cycle():
    edges = import_edges()
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for edge in edges:
        graph[edge.source].add(edge.target)
    cycles = [describe(component, edges) for component in strongly_connected(graph)]
    advice = "make one side depend on the other, or move what both need to a lower module"
    assert not cycles, f"import cycles in shelltrain/ ({advice}):\n" + "\n".join(cycles)


def test_data_depends_only_on_lower_layers():
    """shelltrain/data/ is below the training engine and the job layers: nothing it imports, directly or through
    other modules, reaches them (the console and the config checks it uses are lower modules)."""
    upper = {f"{ROOT}.{name}" for name in ("engine", "runner", "cli")}
    edges = import_edges()
    reached = {edge.target: edge for edge in edges if edge.source.startswith(f"{ROOT}.data")}  # how each is reached
    todo = list(reached)
    while todo:
        module = todo.pop()
        for edge in edges:
            if edge.source == module and edge.target not in reached:
                reached[edge.target] = edge
                todo.append(edge.target)
    paths = []
    for module in sorted(upper & reached.keys()):
        chain, at = [], module
        while not at.startswith(f"{ROOT}.data"):
            chain.append(reached[at])
            at = reached[at].source
        paths.append(" -> ".join([at] + [e.target + f" ({e.where()})" for e in reversed(chain)]))
    assert not paths, "shelltrain/data/ reaches a higher layer:\n" + "\n".join(paths)


# What a light module (the CLI's --help and --cfg job path) must not load: torch and the libraries a run imports
# only where it uses them (plots, the digits data and splits, a logger, a data format, an ensemble's tables).
HEAVY = {
    "torch",
    "torchvision",
    "matplotlib",
    "timm",
    "sklearn",
    "pandas",
    "pyarrow",
    "scipy",
    "mlflow",
    "datasets",
    "webdataset",
    "fsspec",
    "optuna",
}


def top_level_imports(path: Path) -> set[str]:
    """The top-level packages a module imports outside functions (third-party and shelltrain alike)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside = function_nodes(tree)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and id(node) not in inside:
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and id(node) not in inside and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def heavy_packages(edges: list[Edge]) -> dict[str, set[str]]:
    """The HEAVY packages each shelltrain module loads when imported (itself or through its top-level imports)."""
    loads = {name: top_level_imports(path) & HEAVY for name, path in MODULES.items()}
    top = [e for e in edges if not e.in_function and not e.type_checking]
    grew = True
    while grew:
        grew = False
        for edge in top:
            if not loads[edge.target] <= loads[edge.source]:
                loads[edge.source] |= loads[edge.target]
                grew = True
    return loads


def _entry_point(edges: list[Edge]) -> list[Edge]:
    """The command's entry (shelltrain.start) answers --help first and imports the CLI only for a real command."""
    return [e for e in edges if e.source == f"{ROOT}.start" and e.target == f"{ROOT}.cli"]


def test_no_function_level_import_of_shelltrain():
    """Imports inside functions are for heavy or optional dependencies only: a module may defer importing a
    shelltrain module that loads a heavy package it does not load itself (torch for the CLI's --help path,
    matplotlib for a report without plots); any other function-level import hides a dependency (often a cycle)
    from the top of the file."""
    edges = import_edges()
    loads = heavy_packages(edges)
    hidden = sorted(
        (e for e in edges if e.in_function and not loads[e.target] - loads[e.source] and e not in _entry_point(edges)),
        key=lambda e: (e.path, e.line),
    )
    listed = [f"{e.path}:{e.line}: {e.source} imports {e.target}" for e in hidden]
    assert not listed, "function-level imports of shelltrain modules (import them at the top):\n" + "\n".join(listed)


def test_the_light_modules_stay_light():
    """The CLI answers --help and checks a config without loading torch: the deferred imports above buy that."""
    loads = heavy_packages(import_edges())
    assert not any(loads[f"{ROOT}.{name}"] for name in ("start", "cli", "schema", "rundir", "sweep"))
    assert "torch" in loads[f"{ROOT}.runner"] and "torch" in loads[f"{ROOT}.jobs"]


def loaded_by(code: str) -> set[str]:
    """The top-level packages in sys.modules after `code` runs in a fresh interpreter (its stdout silenced)."""
    probe = (
        "import contextlib, io, json, sys\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    exec({code!r})\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_cfg_job_loads_nothing_heavy(tmp_path):
    """`shelltrain --cfg job` (and --help) answer from the config alone: none of the libraries a run needs."""
    code = (
        "import sys; sys.argv = ['shelltrain', '--cfg', 'job', 'model=cnn']\nfrom shelltrain.start import main\nmain()"
    )
    assert loaded_by(code) & HEAVY == set()


def test_starting_a_job_loads_only_torch_and_torchvision():
    """What every run loads before it builds anything: the rest is imported where a configured feature uses it
    (scikit-learn for the digits data and carved splits, matplotlib for plots, pandas never by shelltrain)."""
    assert loaded_by("import shelltrain.jobs") & HEAVY == {"torch", "torchvision"}
