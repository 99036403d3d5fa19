"""The house rules, checked: file sizes, the layering (zoo/ never imports the command layer), no import cycles
in zoo/, recipes/ or callbacks/ (lazy imports included), and docstrings that cite the source documents, not a design file outside the repository."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "recipes", "callbacks", "benchmarks")


def sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules a file imports, at module level or inside functions (a lazy import still ties two modules)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found |= {f"{prefix}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("path", sources(*PACKAGES), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 500


def test_zoo_never_imports_the_command_layer():
    for path in sources("zoo"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # lazy imports included
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("recipes", "callbacks") for n in names), path


def test_no_import_cycles():
    modules = {module_name(p): p for p in sources("zoo", "recipes", "callbacks")}
    graph = {m: {i for i in imports(p) if i in modules and i != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle between modules
    for m in graph:
        graph[m] = {i for i in graph[m] if not (modules[m].name == "__init__.py" and i.startswith(m + "."))}
        graph[m] = {i for i in graph[m] if not (modules.get(i) and modules[i].name == "__init__.py"
                                                and m.startswith(i + "."))}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [m, n])}")
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_docs_and_docstrings_cite_sources_not_a_design_file():
    texts = sources(*PACKAGES, "tests") + sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"] + \
        sorted((ROOT / "configs").rglob("*.yaml"))
    offenders = [str(p.relative_to(ROOT)) for p in texts
                 if p != Path(__file__) and "DESIGN" + ".md" in p.read_text()]
    assert offenders == []
