"""The floors hold: read from the code's own imports (every `import`, also inside functions), not from a picture.

- no import circles between modules;
- no service imports another service (what they share lives on the llm or runtime floor);
- production code imports nothing from the tools wing (CLI, demo, benches, evals, local cluster);
- each floor imports only the floors under it: schemas nothing of ours, runtime only schemas, llm only schemas;
- the installed distribution has exactly one top-level package, `frugalstream`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "services"
PACKAGE = SOURCE / "frugalstream"
SERVICES = ("classifier", "dedupe", "gateway", "summarizer", "accountant", "http_entry", "audit")
# floor -> what it may import of ours (besides itself)
FLOORS = {
    "schemas": set(),
    "runtime": {"schemas"},
    "llm": {"schemas"},
    "client": {"schemas", "runtime"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The module an imported name lives in (`frugalstream.x.y` may name a module or something inside one)."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


@cache
def imports_of(module: str) -> frozenset[str]:
    path = modules()[module]
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import (the project imports absolutely)"
            base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    ours = {_resolve(n) for n in found if n == "frugalstream" or n.startswith("frugalstream.")}
    return frozenset(m for m in ours if m and m != module)


def floor_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def edges() -> Iterator[tuple[str, str]]:
    for module in modules():
        for target in imports_of(module):
            if target != "frugalstream":  # the package face holds a docstring and a version, nothing to import
                yield module, target


def test_the_reader_sees_the_imports_it_must_see() -> None:
    """Guards the guard: a reader that found nothing would pass every test below."""
    assert "frugalstream.runtime.stage" in imports_of("frugalstream.gateway.app")
    assert "frugalstream.llm.pricing.catalog" in imports_of("frugalstream.resources")
    assert "frugalstream.tools.cli" in imports_of("frugalstream.__main__")
    assert len(list(edges())) > 150


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for a, b in edges():
        graph[a].add(b)
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_service_imports_another_service() -> None:
    crossing = [(a, b) for a, b in edges()
                if floor_of(a) in SERVICES and floor_of(b) in SERVICES and floor_of(a) != floor_of(b)]
    assert not crossing, f"services import each other: {crossing}"


def test_production_code_imports_nothing_from_the_tools_wing() -> None:
    wing = [(a, b) for a, b in edges()
            if floor_of(b) == "tools" and floor_of(a) != "tools" and a != "frugalstream.__main__"]
    assert not wing, f"production modules import the tools wing: {wing}"


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_each_low_floor_imports_only_the_floors_under_it(floor: str) -> None:
    allowed = FLOORS[floor] | {floor}
    upward = [(a, b) for a, b in edges() if floor_of(a) == floor and floor_of(b) not in allowed]
    assert not upward, f"{floor} imports above itself: {upward}"


def test_the_distribution_has_exactly_one_top_level_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(ROOT / config["where"][0]), include=config["include"])
    assert packages and {p.split(".")[0] for p in packages} == {"frugalstream"}
    assert set(find_packages(where=str(SOURCE))) == set(packages), "every package under services/ ships"
    # The installed distribution (pip writes direct_url.json), not a build's leftover *.egg-info in a checkout.
    installed = [d for d in importlib.metadata.distributions(name="frugalstream") if d.read_text("direct_url.json")]
    assert len(installed) == 1
    top_level = installed[0].read_text("top_level.txt")
    assert top_level is not None and top_level.split() == ["frugalstream"]
