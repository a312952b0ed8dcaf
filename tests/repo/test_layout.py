"""lib/ reads as one house: a package per concern (at most 14 entries at its top, no Kconfig files there),
no import circle between its modules nor between its packages, counting imports inside functions (those
under TYPE_CHECKING aside), and lib/core importing nothing else of lib."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

LIB = ROOT / "lib"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the lib modules it imports anywhere in its source}."""
    modules = {module_name(p): p for p in LIB.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _type_checking(node.test)
                  for n in ast.walk(node)}
        found = set()
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_lib_has_a_package_per_concern() -> None:
    entries = sorted(p.name for p in LIB.iterdir() if p.name not in ("__init__.py", "__pycache__"))
    assert len(entries) <= 14, entries
    assert not [e for e in entries if e.startswith("Kconfig")], "Kconfig files belong inside their package"
    assert all((LIB / e).is_dir() for e in entries if e != "cli.py"), entries


def test_no_import_circle_between_modules() -> None:
    assert cycles(import_graph()) == []


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        packages.setdefault(package_of(module), set()).update(
            package_of(m) for m in imported if package_of(m) != package_of(module))
    for targets in list(packages.values()):
        for target in targets:
            packages.setdefault(target, set())
    return packages


def test_no_import_circle_between_packages() -> None:
    assert cycles(package_graph(import_graph())) == []


def test_core_imports_nothing_else_of_lib() -> None:
    outside = {f"{m} -> {d}" for m, imported in import_graph().items() if package_of(m) == "lib.core"
               for d in imported if package_of(d) != "lib.core"}
    assert not outside, sorted(outside)


def test_the_circle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "lib.results" in graph["lib.results.report"]  # imports inside functions count too
    assert package_graph({"lib.a.x": {"lib.b.y"}, "lib.b.y": {"lib.a.z"}, "lib.a.z": set()}) == {
        "lib.a": {"lib.b"}, "lib.b": {"lib.a"}}


CHECKPOINT_NAMES = re.compile(r"best\.pt|\.ckpt\b|step_\d{8}|[\"']latest[\"']|[\"']milestones[\"']|milestones/")


def checkpoint_names_outside(home: Path, roots: list[Path]) -> list[str]:
    """Lines of Python code under ``roots`` (``home`` aside) that spell a checkpoint file's name."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if home in path.parents:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if CHECKPOINT_NAMES.search(line):
                    found.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    return found


def test_only_lib_checkpoint_spells_checkpoint_file_names(tmp_path: Path) -> None:
    """The run folder's checkpoint layout has one owner (lib/checkpoint/folder.py); nothing else spells it."""
    assert checkpoint_names_outside(LIB / "checkpoint", [LIB, ROOT / "scripts"]) == []
    (tmp_path / "elsewhere.py").write_text('best = run_dir / "checkpoints" / "best.pt"\n')
    assert len(checkpoint_names_outside(LIB / "checkpoint", [tmp_path])) == 1  # the finder finds one


TESTS = ROOT / "tests"
OWN_FOLDERS = {"cli": "the Makefile and lib/cli.py", "repo": "house rules", "scripts": "scripts/"}


def test_files_mirror_packages_and_stay_small() -> None:
    """tests/<package>/ for each package of lib/ and each model family; every Python file under ~400 lines."""
    packages = {p.name for p in LIB.iterdir() if (p / "__init__.py").is_file()}
    families = {p.parent.name for p in ROOT.glob("*/task.py")}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders - packages - families - set(OWN_FOLDERS) == set()
    assert not list(TESTS.glob("test_*.py")), "a test file at the top of tests/: move it into its package's folder"
    long = [f"{p.relative_to(ROOT)}: {n}" for p in [*LIB.rglob("*.py"), *TESTS.rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 420]
    assert long == []
