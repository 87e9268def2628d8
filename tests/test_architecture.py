"""The shape of the code: no import cycles, every module importable on its
own, dependencies that point the way the layers do, and storage keys built
and read in one module.

Imports are read with ``ast``, every one of them: module level, inside
functions (a function-local import that only hides a cycle is still a cycle
here) and under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
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


def outside_imports() -> set[str]:
    """The top-level names of what the project imports from outside itself
    (the standard library and third-party packages), by absolute import."""
    found = set()
    for path in module_files().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.partition(".")[0])
    return found - set(PACKAGES) - {"__future__"}


# Run in one fresh interpreter: import what the project imports from outside
# (none of the project), then fork once per project module, two at a time
# (the machine has two cores), and import it first in the child. The children
# start with nothing of the project loaded, which is what the test is about;
# the outside imports, the bulk of an interpreter's start (grpc, aiohttp,
# cryptography…), are paid once.
_FIRST_IMPORTS = """
import importlib, json, os, sys
outside, names, project = json.loads(sys.stdin.read())
for name in outside:
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # optional or platform-specific: the child meets it on its own
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in project)
assert not loaded, f"the parent loaded project modules: {loaded}"
failures, running, waiting = {}, {}, list(reversed(names))
while waiting or running:
    while waiting and len(running) < 2:
        name = waiting.pop()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                importlib.import_module(name)
                error = ""
            except BaseException as exc:
                error = f"{type(exc).__name__}: {exc}"
            os.write(write_end, error.encode()[:4000])  # under a pipe's buffer: never blocks
            os._exit(0)
        os.close(write_end)
        running[pid] = name, read_end
    pid, status = os.wait()
    name, read_end = running.pop(pid)
    with os.fdopen(read_end, "rb") as reader:
        error = reader.read().decode()
    if error or status:
        failures[name] = error or f"the child died (wait status {status})"
print(json.dumps(failures))
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Importing any module first works: no module leans on another having
    been imported before it (what a hidden cycle breaks)."""
    names = [n for n in module_files() if not n.endswith("__main__")]
    result = subprocess.run(
        [sys.executable, "-c", _FIRST_IMPORTS], cwd=ROOT, capture_output=True, text=True,
        timeout=600, check=True,
        input=json.dumps([sorted(outside_imports()), names, list(PACKAGES)]))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


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


# -- one key grammar ------------------------------------------------------------
#
# Storage keys are built and read only in ``registry_node/keys.py``. Outside it a
# key may be built by calling a builder, read with ``keys.parse``, passed on, stored
# and compared whole; it may not be assembled with an operator, sliced, measured,
# split or prefix-tested with a bytes method, nor written as a literal. What a key
# is comes from ``keys.py`` itself: its bytes constants, its functions that return
# bytes (builders) and the family heads (``log\0``, ``r\0`` …) its constants begin.

KEYS_MODULE = "registry_node.keys"
_BYTES_METHODS = frozenset(name for name in dir(bytes) if not name.startswith("_"))
_MEASURES = frozenset({"len", "bytes", "bytearray", "memoryview"})
_SCOPES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass(frozen=True)
class KeyGrammar:
    constants: frozenset[str]       # names of keys.py's bytes constants
    builders: frozenset[str]        # names of keys.py's functions that return bytes
    sep: bytes
    families: tuple[bytes, ...]     # "<family>\0": the head of every key of a family


def key_grammar() -> KeyGrammar:
    module = importlib.import_module(KEYS_MODULE)
    constants = {name: value for name, value in vars(module).items() if isinstance(value, bytes)}
    builders = {name for name, value in vars(module).items()
                if inspect.isfunction(value) and value.__module__ == KEYS_MODULE
                and value.__annotations__.get("return") in ("bytes", bytes)}
    sep = module.SEP
    families = {value.partition(sep)[0] + sep for value in constants.values()
                if sep in value and not value.startswith(sep)}
    return KeyGrammar(frozenset(constants), frozenset(builders), sep, tuple(sorted(families)))


def key_grammar_breaches(name: str, path: Path, grammar: KeyGrammar) -> list[str]:
    """Every place in module ``name`` that builds or takes apart key bytes by hand."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    modules: set[str] = set()           # names bound to the keys module
    constants: set[str] = set()         # key constants imported by name
    builders: set[str] = set()          # builders imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.asname for a in node.names if a.name == KEYS_MODULE and a.asname)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                bound = alias.asname or alias.name
                if f"{base}.{alias.name}" == KEYS_MODULE:
                    modules.add(bound)
                elif base == KEYS_MODULE and alias.name in grammar.constants:
                    constants.add(bound)
                elif base == KEYS_MODULE and alias.name in grammar.builders:
                    builders.add(bound)

    def scope_of(node: ast.AST) -> ast.AST:
        node = parents[node]
        while not isinstance(node, _SCOPES):
            node = parents[node]
        return node

    bound: dict[ast.AST, set[str]] = {}     # scope → local names holding a key

    def holds_key(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            return node.value.id in modules and node.attr in grammar.constants
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                return func.value.id in modules and func.attr in grammar.builders
            return isinstance(func, ast.Name) and func.id in builders
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in constants:
                return True
            scope: ast.AST | None = node
            while scope is not None and not isinstance(scope, ast.Module):
                scope = scope_of(scope)
                if node.id in bound.get(scope, ()):
                    return True
        return False

    assignments = [node for node in ast.walk(tree)
                   if isinstance(node, ast.Assign | ast.AnnAssign | ast.NamedExpr)]
    changed = True
    while changed:                      # a name copied from a name that holds a key holds one
        changed = False
        for node in assignments:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if node.value is None or not holds_key(node.value):
                continue
            names = bound.setdefault(scope_of(node), set())
            for target in targets:
                if isinstance(target, ast.Name) and target.id not in names:
                    names.add(target.id)
                    changed = True

    found = []

    def breach(node: ast.AST, what: str) -> None:
        found.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:"
                     f"{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, bytes | str):
            raw = node.value if isinstance(node.value, bytes) else node.value.encode()
            # A lone NUL in a str is text (a hash input, say), not a key separator.
            lone_separator = raw == grammar.sep and isinstance(node.value, bytes)
            if lone_separator or raw.startswith(grammar.families):
                breach(node, f"key bytes written as a literal: {node.value!r}")
            continue
        if not holds_key(node):
            continue
        parent = parents.get(node)
        while isinstance(parent, ast.List | ast.Tuple | ast.Starred | ast.keyword):
            parent = parents.get(parent)
        if isinstance(parent, ast.BinOp | ast.AugAssign):
            breach(node, "a key assembled with an operator")
        elif isinstance(parent, ast.Subscript) and parent.value is node:
            breach(node, "a key sliced")
        elif isinstance(parent, ast.Attribute) and parent.attr in _BYTES_METHODS:
            breach(node, f"bytes.{parent.attr}() called on a key")
        elif isinstance(parent, ast.Call) and node is not parent.func:
            func = parent.func
            if isinstance(func, ast.Name) and func.id in _MEASURES:
                breach(node, f"a key passed to {func.id}()")
            elif isinstance(func, ast.Attribute) and func.attr in _BYTES_METHODS:
                breach(node, f"a key passed to bytes.{func.attr}()")
    return found


def test_the_key_guard_finds_keys_taken_apart_or_assembled_by_hand(tmp_path):
    """The guard itself can fail: each line marked ``breach`` below is found,
    and none of the legitimate uses around them is."""
    source = '''
from registry_node import keys
from registry_node.keys import SEP as NUL, tag_prefix

def allowed(meta, batch, repo, k):
    meta.scan(keys.BLOB)
    meta.get(keys.tag(repo, "v1"))
    prefix = keys.tag_prefix(repo)
    meta.scan(prefix, keys.tag(repo, "a"))
    print(keys.render(k) + "!", b"georeg/v1\\x00" + k, len(k))
    return keys.tag(repo, "x") in batch.puts, keys.parse(k, keys.TagKey).tag

def by_hand(k, repo):
    k.split(keys.SEP)                          # breach
    k[len(keys.LOG):]                          # breach
    keys.repo_prefix(repo) + b"b"              # breach
    k.startswith(keys.repo_prefix(repo))       # breach
    prefix = keys.tag_prefix(repo)
    start = prefix
    k[len(start):]                             # breach
    k.partition(NUL)                           # breach
    tag_prefix(repo) + b"x"                    # breach
    b"meta\\x00keycheck"                        # breach
    k.split(b"\\x00")                           # breach
    keys.LOG.join([k])                         # breach
    k.split(sep=keys.SEP)                      # breach
    keys.tag(repo, "v1")[:-1]                  # breach
'''
    path = tmp_path / "sample.py"
    path.write_text(source)
    expected = [i for i, line in enumerate(source.splitlines(), 1) if line.endswith("# breach")]
    found = key_grammar_breaches("sample", path, key_grammar())
    assert sorted({int(f.split(":")[1]) for f in found}) == expected, found


def test_keys_are_built_and_parsed_only_in_keys_py():
    grammar = key_grammar()
    breaches = [breach for name, path in module_files().items() if name != KEYS_MODULE
                for breach in key_grammar_breaches(name, path, grammar)]
    assert breaches == []
