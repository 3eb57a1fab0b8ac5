"""The package's floor plan, read from its imports with ``ast`` (imports inside
functions and ``TYPE_CHECKING`` blocks included): wings by concept, one floor each,
imports only downwards, no circle, no one else's private names."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "actsparse_deploy"

#: the wings, ground floor first: a wing imports only from the wings before it
WINGS = ("base", "data", "nn", "calibration", "bake", "onnx", "models", "app")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path, modules: set[str]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of the package."""
    module = module_name(path)
    found: list[tuple[str, str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "actsparse_deploy"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node, path.name == "__init__.py")
            if target.split(".")[0] != "actsparse_deploy":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    found.append((sub, "", node.lineno))  # from package import module
                else:
                    found.append((target, alias.name, node.lineno))
    return found


@functools.cache
def graph() -> dict[str, list[tuple[str, str, int]]]:
    """Module -> its imports of the package's modules (read once per test process: only read)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: [(t, n, line) for t, n, line in imports(p, set(files)) if t in files and t != m] for m, p in files.items()}


def wing(module: str) -> int | None:
    parts = module.split(".")
    return WINGS.index(parts[1]) if len(parts) > 1 and parts[1] in WINGS else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_wing():
    loose = sorted(m for m in graph() if wing(m) is None and m not in ("actsparse_deploy", "actsparse_deploy.__main__"))
    assert loose == []


def test_no_cycle():
    edges = {m: {t for t, _, _ in found} for m, found in graph().items()}
    assert cycles(edges) == []


def test_wings_import_only_downwards():
    upward = [
        f"{m}:{line} imports {t}"
        for m, found in graph().items()
        for t, _, line in found
        if wing(m) is not None and wing(t) is not None and wing(t) > wing(m)  # type: ignore[operator]
    ]
    assert upward == []


def test_no_module_imports_itself():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    selves = [f"{m}:{line}" for m, p in files.items() for t, _, line in imports(p, set(files)) if t == m]
    assert selves == []


def test_no_private_name_of_another_module():
    private = [f"{m}:{line} takes {t}.{n}" for m, found in graph().items() for t, n, line in found if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_the_package_face_imports_nothing_heavy():
    """Sub-package faces hand no names on: importing one module of a wing imports no other."""
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)], init


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_the_readme_maps_every_wing_and_module():
    """The README's layout table names each wing, then each of its modules."""
    text = (PACKAGE.parent / "README.md").read_text()
    table = text[text.index("## Layout"):]
    table = table[: table.index("\n\n", table.index("| wing / module |"))]
    wings = [w for w in WINGS if f"**`{w}/`**" in table]
    assert wings == list(WINGS)
    for w in WINGS:
        section = table[table.index(f"**`{w}/`**"):]
        section = section[: section.index("**`", section.index("**`") + 3) if w != WINGS[-1] else len(section)]
        modules = sorted(p.name for p in (PACKAGE / w).glob("*.py") if p.name != "__init__.py")
        assert [m for m in modules if f"`{m}`" not in section] == [], w
