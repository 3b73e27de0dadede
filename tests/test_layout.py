"""The layout holds: no import cycle among llmctl's modules (imports inside functions count too: a lazy import
hides a cycle, it does not remove it), library modules never import stages, stages never import each other, and
no Python file is over 450 lines (a module past that is a signal to look again, see ../shared/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "llmctl"
MAX_LINES = 450
LONGER = {}  # path relative to llmctl/ -> why it may be longer (each such file says so in its docstring)


def _name(path: Path) -> str:
    parts = ["llmctl", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The llmctl modules `path` imports anywhere in it (`from llmctl import x` names module llmctl.x if there is
    one, else the package)."""
    me = _name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:  # `import llmctl.x.y` names module llmctl.x.y or a package above it
                n = n.rpartition(".")[0]
            if n and n != me:
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, mods) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    g = graph()
    assert "llmctl.model" in g and g["llmctl.hf"] >= {"llmctl.model"}  # the walk sees imports
    found = cycles(g)
    assert not found, "import cycles (each a set of modules importing each other): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_stages_sit_on_the_library():
    g = graph()
    stages = {m for m in g if m.startswith("llmctl.stages.")}
    for m, deps in g.items():
        if m in stages:
            assert not deps & stages, f"{m} imports another stage: {sorted(deps & stages)}"
        elif m not in ("llmctl.cli", "llmctl.cli_run"):  # the command line dispatches to the stages
            assert not deps & (stages | {"llmctl.stages"}), f"library module {m} imports a stage"


def test_no_file_over_450_lines():
    long = {}
    for p in sorted(PKG.rglob("*.py")):
        n = len(p.read_text(encoding="utf-8").splitlines())
        rel = str(p.relative_to(PKG))
        if n > MAX_LINES and rel not in LONGER:
            long[rel] = n
    assert not long, f"over {MAX_LINES} lines: {long}"
    for rel, why in LONGER.items():
        assert why in (PKG / rel).read_text(encoding="utf-8"), f"{rel} must say in its docstring why it is longer"
