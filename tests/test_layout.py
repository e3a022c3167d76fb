"""The package layout holds: no import cycles, no upward imports, no stage importing another.

The graph is read from the source with :mod:`ast`, so it sees every import: top-level,
function-level and ``TYPE_CHECKING`` ones alike (a cycle hidden in a function is still a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmie"

# Bottom to top. A package imports only from packages of a lower or equal rank, and a stage
# package never imports another stage: it reads that stage's artifact instead.
RANK = {"mmie": 0, "core": 0, "lid": 1, "sae": 1, "edits": 2, "metrics": 2, "cli": 4}
STAGES = ("layers", "train_sae", "unlearn", "evaluate", "gate", "neurons", "report", "datacheck",
          "depth", "sweep")
RANK.update({stage: 3 for stage in STAGES})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every mmie module that ``module`` imports (``from pkg import submodule`` included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mmie"))
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, path, node)
            if not target.startswith("mmie"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {name for name in found if name != module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None (iterative DFS)."""
    state: dict[str, int] = {}
    for start in sorted(edges):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(edges[start])))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child) and child in edges:
                state[child] = 1
                stack.append((child, iter(sorted(edges[child]))))
                path.append(child)
    return None


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else "mmie"


def test_find_cycle_detects_a_hidden_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    assert find_cycle(graph()) is None


def test_every_package_has_a_rank():
    assert {package(m) for m in modules()} - {"__main__"} <= set(RANK)


def test_no_upward_or_cross_stage_imports():
    bad = []
    for module, deps in graph().items():
        if module == "mmie.__main__":
            continue
        here = package(module)
        for dep in deps:
            there = package(dep)
            upward = RANK[there] > RANK[here]
            cross = here != there and here in STAGES and there in STAGES
            if upward or cross:
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_top_level_holds_only_packages():
    allowed = ("__init__.py", "__main__.py")
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name not in allowed)
    assert not loose


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: module_name(p))
def test_no_module_over_limit(path: Path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 420


def test_registry_refuses_duplicates_and_unknown_names():
    from mmie.core.registry import Registry

    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.add("a", 2)
    with pytest.raises(ValueError, match="unknown thing 'b'; known: a"):
        reg.lookup("b")
    with pytest.raises(KeyError):
        reg["b"] = 3
    reg["a"] = 4
    assert dict(reg) == {"a": 4} and reg.names() == ["a"]
