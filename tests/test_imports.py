"""qbench's modules import each other without a circle: the rooms of DESIGN.md stack, arrows point one way.

Every ``import qbench...`` / ``from qbench... import`` counts, at the top of a module and inside functions
alike: a lazy import only hides a circle from Python's import machinery, not from the reader.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1] / "qbench"

SKIP_MODULES: tuple = ()
SKIP_EDGES: set = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _target(name: str, known: Dict[str, Path]) -> Optional[str]:
    """The qbench module ``name`` names, or its closest enclosing one (``qbench.x.func`` -> ``qbench.x``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(mod: str, path: Path, known: Dict[str, Path]) -> Set[str]:
    out: Set[str] = set()
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from qbench.measure import gpu_state" imports the module qbench.measure.gpu_state
            names = [f"{base}.{a.name}" for a in node.names] or [base]
        for name in names:
            if name.split(".")[0] != "qbench":
                continue
            target = _target(name, known)
            if target and target != mod:
                out.add(target)
    return out


def skipped(name: str) -> bool:
    return any(name == s or name.startswith(s + ".") for s in SKIP_MODULES)


def import_graph() -> Dict[str, Set[str]]:
    known = modules()
    graph = {}
    for mod, path in known.items():
        if skipped(mod):
            continue
        graph[mod] = {t for t in imports_of(mod, path, known) if not skipped(t) and (mod, t) not in SKIP_EDGES}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import circle as a path [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_sees_lazy_and_top_level_imports():
    graph = import_graph()
    assert "qbench.errors" in graph["qbench.config"]  # top of the module
    assert "qbench.evaluate.accuracy" in graph["qbench.run.cell"]  # inside run()
    assert "qbench.measure.gpu_state" in graph["qbench.measure.cpu_affinity"]  # "from package import module"


def test_find_cycle_reports_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_errors_is_a_leaf():
    assert import_graph()["qbench.errors"] == set()


# The rooms of DESIGN.md, top to bottom: a module may import from its own room or from a room below it.
# report/ sits beside run/ at the top: it reads runs/ afterwards and never imports the run stage.
ROOM_RANK = {"__main__": -1, "run": 0, "report": 0, "methods": 1, "load": 2, "measure": 2, "evaluate": 2,
             "store": 3, "config": 4, "errors": 5, "data": 6}  # data/: bundled files and the script that cut them
SIDEWAYS_OK = {("methods", "load"), ("methods", "measure")}  # a method loads weights and measures its own runtime
UPWARD_KNOWN: Set[tuple] = set()


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qbench"


def test_every_module_lives_in_a_room():
    assert {room(m) for m in import_graph()} - {"qbench"} <= set(ROOM_RANK)


def test_arrows_point_down():
    upward = []
    for mod, targets in import_graph().items():
        for t in targets:
            a, b = room(mod), room(t)
            if a == b or a == "qbench" or (a, b) in SIDEWAYS_OK or (mod, t) in UPWARD_KNOWN:
                continue
            if ROOM_RANK[b] <= ROOM_RANK[a]:
                upward.append(f"{mod} -> {t}")
    assert not upward, "imports that point up or sideways between rooms: " + ", ".join(sorted(upward))


def test_the_room_check_sees_an_arrow_up():
    assert ROOM_RANK[room("qbench.store")] > ROOM_RANK[room("qbench.run.cell")]  # run -> store is down
    assert ROOM_RANK[room("qbench.run.cli")] < ROOM_RANK[room("qbench.measure.latency")]  # measure -> run would be up
