"""The shape of the code: no import cycles, every module importable on its
own, and dependencies that point the way the layers do.

Imports are read with ``ast``, every one of them: module level, inside
functions (a function-local import that only hides a cycle is still a cycle
here) and under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("registry_node", "replicator", "cluster")

# Who may not import whom: (importer prefix, imported prefix, why).
FORBIDDEN = [
    ("registry_node", "replicator", "a node runs without replication; replication plugs in "
                                    "through the node's Protocols"),
    ("registry_node", "cluster", "a node knows nothing of the cluster around it"),
    ("replicator", "cluster", "replication between nodes knows nothing of the supervisor"),
    ("cluster.control", "cluster.cli", "the CLI is a layer over the control plane"),
    ("cluster.routing", "cluster.cli", "the CLI is a layer over routing"),
    ("cluster.network", "cluster.cli", "the CLI is a layer over the network"),
    ("cluster.faults", "cluster.cli", "the CLI is a layer over faults"),
    ("cluster.bench", "cluster.cli", "benchmarks use the cluster, not the CLI"),
    ("cluster.routing", "cluster.control", "routing gets its cluster injected"),
    ("cluster.routing", "cluster.faults", "faults act on routing, not the other way"),
    ("cluster.network.links", "cluster.control", "links carry bytes and know no spec"),
    ("cluster.network", "cluster.routing", "the network knows no routing"),
    ("cluster.network", "cluster.faults", "faults act on links, not the other way"),
    ("cluster.control", "cluster.bench", "the control plane does not benchmark itself"),
    ("cluster.routing", "cluster.bench", "routing does not benchmark itself"),
    ("cluster.faults", "cluster.bench", "faults do not benchmark"),
]


def module_files() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_function_local_imports_and_finds_a_cycle(tmp_path):
    """The checker itself can fail: two modules that import each other, one of
    them only inside a function, are a cycle."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    known = {"a", "b"}
    graph = {name: imports_of(name, tmp_path / f"{name}.py", known) for name in known}
    assert cycles(graph) == [["a", "b"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_dependencies_point_down_the_layers():
    broken = []
    for importer, imported in sorted(import_graph().items()):
        for target in sorted(imported):
            for low, high, why in FORBIDDEN:
                if _within(importer, low) and _within(target, high):
                    broken.append(f"{importer} imports {target}: {why}")
    assert broken == []


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_cluster_is_in_wings():
    """Every module of ``cluster`` lives in a sub-package, except the two
    entry points for users' tests."""
    top = sorted(p.name for p in (ROOT / "cluster").glob("*.py"))
    assert top == ["__init__.py", "pytest_plugin.py", "testing.py"]


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Importing any module first works: no module leans on another having
    been imported before it (what a hidden cycle breaks)."""
    names = [n for n in module_files() if not n.endswith("__main__")]

    def first_import(name: str) -> tuple[str, str]:
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        return name, "" if result.returncode == 0 else result.stderr.strip().splitlines()[-1]

    with ThreadPoolExecutor(4) as pool:
        failures = {name: error for name, error in pool.map(first_import, names) if error}
    assert failures == {}


def test_a_node_process_loads_no_cluster_control():
    """``georeg node`` (what the supervisor runs, once per node) loads the node
    and replication, not the control plane, routing or rich tables."""
    code = ("import sys, runpy; sys.argv = ['georeg', 'node', '--help']\n"
            "try:\n    runpy.run_module('cluster.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('cluster.') or m == 'rich'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    loaded = eval(result.stdout.strip().splitlines()[-1])  # noqa: S307 - our own output
    assert loaded == ["cluster.cli", "cluster.cli.main", "cluster.cli.node"]
