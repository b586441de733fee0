"""The packages' layout: bridge holds __init__.py, cli.py and its wings; imports run one way (no
circle anywhere in bridge, bi_torch, bi_jax; each wing of bridge imports only those below it; the
kernels only bridge.numerics). Read from the source by `ast`, every import, inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "bi_torch", "bi_jax")
FRAMEWORKS = {"torch", "triton", "jax", "jaxlib", "flax"}
# Each wing of bridge and the wings (and kernel packages) it may import: numerics at the bottom,
# cli.py on top. bridge/__init__.py exports numerics' names and `dlpack` (interop) on first use.
BELOW = {
    "bridge.numerics": set(),
    "bridge.golden": {"bridge.numerics"},
    "bridge.interop": {"bridge.numerics", "bi_torch", "bi_jax"},
    "bridge.verify": {"bridge.numerics", "bridge.golden", "bridge.interop", "bi_torch", "bi_jax"},
    "bridge.bench": {"bridge.numerics", "bi_torch", "bi_jax"},
    "bridge.cli": {"bridge.numerics", "bridge.golden", "bridge.verify", "bridge.bench"},
    "bridge": {"bridge.numerics", "bridge.interop"},
}


def _modules() -> Dict[str, Path]:
    """{dotted name: path} of every module of the three packages (a package by its own name)."""
    found = {}
    for top in PACKAGES:
        for path in (REPO / top).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The modules of the three packages that `name` imports (a name imported from a package resolves
    to its submodule when there is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _wing(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "bridge" else parts[0]


def test_bridge_holds_its_init_its_cli_and_the_wings() -> None:
    entries = {p.name for p in (REPO / "bridge").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert entries == {"__init__.py", "cli.py", "numerics", "golden", "interop", "verify", "bench"}


def test_no_import_circle() -> None:
    graph = _graph()
    done: Set[str] = set()

    def visit(name: str, path: List[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_each_wing_of_bridge_imports_only_those_below_it() -> None:
    wrong = []
    for name, targets in _graph().items():
        if name.startswith("bridge"):
            wing = _wing(name)
            wrong += [f"{name} imports {t}" for t in sorted(targets) if _wing(t) not in BELOW[wing] | {wing}]
    assert not wrong, "\n".join(wrong)


def test_the_kernels_take_only_the_numerics_from_bridge() -> None:
    wrong = [f"{name} imports {t}" for name, targets in _graph().items() if not name.startswith("bridge")
             for t in sorted(targets) if t.startswith("bridge") and _wing(t) != "bridge.numerics"]
    assert not wrong, "\n".join(wrong)


def test_the_numerics_and_the_corpus_import_no_framework() -> None:
    wrong = []
    for wing in ("numerics", "golden"):
        for path in sorted((REPO / "bridge" / wing).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                wrong += [f"{path.relative_to(REPO)} imports {n}" for n in names if n.split(".")[0] in FRAMEWORKS]
    assert not wrong, "\n".join(wrong)
