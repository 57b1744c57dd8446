"""The layering, read from the source: core imports nothing of ours, proxy/planner/runtime stand
on core side by side, and no package imports another in a circle.

Allowed edges (package -> packages it may import):
- core -> nothing of ours;
- runtime -> core;
- planner -> core (it talks to the runtime only through `core.interfaces.Runtime`);
- proxy -> core, planner, runtime (it wires them together at start-up);
- the codec (proxy/messages.py) -> core only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "proxy", "planner", "runtime")
NOT_SHIPPED = ("testing", "tests", "benchmarks")  # left out of the wheel (pyproject's packages.find)
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "runtime": {"core"},
    "planner": {"core"},
    "proxy": {"core", "planner", "runtime"},
}


def _imports(path: Path) -> set[str]:
    """Top-level packages of ours that `path` imports, anywhere in the file (lazy imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out.update(n.split(".")[0] for n in names if n.split(".")[0] in (*PACKAGES, *NOT_SHIPPED))
    return out


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_it_stands_on(package: str) -> None:
    bad = {
        str(path.relative_to(ROOT)): sorted(found)
        for path in _modules(package)
        if (found := _imports(path) - ALLOWED[package] - {package})
    }
    assert bad == {}, f"{package}/ may import only {sorted(ALLOWED[package])}: {bad}"


def test_codec_imports_only_core() -> None:
    assert _imports(ROOT / "proxy" / "messages.py") <= {"core", "proxy"}
    tree = ast.parse((ROOT / "proxy" / "messages.py").read_text())
    ours = [
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "proxy"
    ]
    assert ours == [], f"the codec must not lean on the rest of proxy/: {ours}"


def test_no_cycles_between_packages() -> None:
    graph = {p: set().union(*(_imports(m) for m in _modules(p))) - {p} for p in PACKAGES}
    for start in PACKAGES:
        seen: set[str] = set()
        stack = list(graph[start])
        while stack:
            node = stack.pop()
            assert node != start, f"import cycle through {start}: {graph}"
            if node in seen or node not in graph:
                continue
            seen.add(node)
            stack.extend(graph[node])


def test_shipped_packages_import_no_tests_or_benchmarks() -> None:
    bad = [
        str(m.relative_to(ROOT))
        for p in PACKAGES
        for m in _modules(p)
        if _imports(m) & set(NOT_SHIPPED)
    ]
    assert bad == []


def test_benchmarks_and_testing_do_not_import_tests() -> None:
    bad = {
        str(m.relative_to(ROOT)): sorted(found)
        for p in ("benchmarks", "testing")
        for m in _modules(p)
        if (found := _imports(m) & ({"tests", "benchmarks"} - {p}))
    }
    assert bad == {}, "benchmarks share fixtures through testing/, never tests/"


def test_the_wheel_leaves_the_fixtures_out() -> None:
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert sorted(p.rstrip("*") for p in include["include"]) == sorted(PACKAGES)
