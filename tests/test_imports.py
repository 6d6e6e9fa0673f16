"""The library's parts depend one way: no import cycle, and the layering its design rests on.

The imports are read from the source (tests/import_scan.py), function-level ones included: an import inside a
function is a dependency all the same, it only runs later. Imports under ``if TYPE_CHECKING:`` never run and
are left out. ``from a import b`` depends on the module ``a.b`` when there is one, else on ``a``; importing
``a.b`` also runs ``a/__init__.py``, which is left out here (a package's ``__init__`` imports nothing that
its submodules need, so it cannot close a cycle).

An *area* is a top-level module or package of ``virtual_contrast`` (``io``, ``cohort``, ``preprocess``, ...);
README.md (Development) draws their graph.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest
from import_scan import import_statements
from workflow_helpers import REPO

PACKAGE = "virtual_contrast"

#: (importer, imported, why): no module of the first area (or module) may reach one of the second, directly
#: or through other modules.
FORBIDDEN = [
    ("virtual_contrast.preprocess", "virtual_contrast.model", "pre-processing knows no model"),
    (
        "virtual_contrast.evaluate",
        "virtual_contrast.model",
        "evaluation scores any method's output, so it knows no model",
    ),
    (
        "virtual_contrast.evaluate",
        "virtual_contrast.preprocess",
        "evaluation scores any method's output, however it was pre-processed",
    ),
    (
        "virtual_contrast.reader",
        "virtual_contrast.model",
        "reader statistics work on annotations alone",
    ),
    (
        "virtual_contrast.reader",
        "virtual_contrast.preprocess",
        "reader statistics work on annotations alone",
    ),
    (
        "virtual_contrast.evaluate",
        "virtual_contrast.reader",
        "what the automated reader shares with the reader study lives in annotations, matching and report",
    ),
    (
        "virtual_contrast.reader",
        "virtual_contrast.evaluate",
        "what the reader study shares with evaluation lives in annotations, matching and report",
    ),
    (
        "virtual_contrast.cohort",
        "virtual_contrast.workflow",
        "the workflow plans the cohort with cohort.plan, not the reverse",
    ),
]
#: Modules that must not reach torch: the workflow builds and checks them at parse time.
TORCH_FREE = (
    "virtual_contrast.model.config",
    # The DICOM export names the models by it, in an environment without torch (envs/dicom.yaml).
    "virtual_contrast.model.digest",
    "virtual_contrast.checks",
    "virtual_contrast.workflow",
)
#: Cycles between areas that another change removes, with why they are here; one that no longer occurs
#: fails the test, so that it is removed from this list.
KNOWN_AREA_CYCLES: dict[frozenset[str], str] = {}


# --- the graph ------------------------------------------------------------------------------------------------


def module_sources(root: Path, package: str = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (source file, is a package) of every module of ``package`` under ``root``."""
    sources = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        sources[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return sources


def import_graph(
    root: Path, package: str = PACKAGE
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the package's modules it imports, module -> top-level names of the others it imports)."""
    sources = module_sources(root, package)
    inside: dict[str, set[str]] = {}
    outside: dict[str, set[str]] = {}
    for module, (path, is_package) in sources.items():
        mine, others = set(), set()
        for statement in import_statements(ast.parse(path.read_text()), module, is_package):
            top = statement.base.split(".")[0]
            if top != package:
                others.add(top)
                continue
            assert statement.base in sources, f"{path}: no module {statement.base}"
            submodules = {f"{statement.base}.{n}" for n in statement.names} & set(sources)
            mine |= submodules
            if not statement.names or len(submodules) < len(statement.names):
                mine.add(statement.base)  # a name defined in the module (or package) itself
        mine.discard(module)
        inside[module], outside[module] = mine, others
    return inside, outside


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one node (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def path_between(graph: dict[str, set[str]], start: str, goal) -> list[str] | None:
    """The shortest import chain from ``start`` to a module for which ``goal(module)`` holds, or None."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if goal(node) and node != start:
            chain = [node]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])
            return chain[::-1]
        for nxt in sorted(graph.get(node, ())):
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def area(module: str) -> str:
    """The top-level module or package of ``module`` (``virtual_contrast`` itself for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def area_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    areas: dict[str, set[str]] = {}
    for module, targets in graph.items():
        areas.setdefault(area(module), set()).update(area(t) for t in targets)
    return {a: targets - {a} for a, targets in areas.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.fixture(scope="module")
def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph(REPO)


# --- the rules ------------------------------------------------------------------------------------------------


def test_no_module_imports_another_that_imports_it_back(graphs):
    inside, _ = graphs
    assert len(inside) > 50  # the walk really saw the package
    assert cycles(inside) == []


def test_no_cycle_between_areas_but_the_known_ones(graphs):
    found = {frozenset(c) for c in cycles(area_graph(graphs[0]))}
    assert found - set(KNOWN_AREA_CYCLES) == set(), "new cycles between areas"
    stale = set(KNOWN_AREA_CYCLES) - found
    assert not stale, f"KNOWN_AREA_CYCLES that no longer occur (remove them): {stale}"


def test_io_is_the_floor(graphs):
    inside, _ = graphs
    assert inside[f"{PACKAGE}.io"] == set()


@pytest.mark.parametrize(("importer", "imported", "why"), FORBIDDEN)
def test_parts_depend_one_way(graphs, importer, imported, why):
    inside, _ = graphs
    for module in sorted(m for m in inside if _within(m, importer)):
        chain = path_between(inside, module, lambda m: _within(m, imported))
        assert chain is None, f"{' -> '.join(chain)}: {why}"


@pytest.mark.parametrize("module", TORCH_FREE)
def test_parse_time_modules_import_no_torch(graphs, module):
    inside, outside = graphs
    chain = path_between(
        {**inside, "torch": set()}, module, lambda m: "torch" in outside.get(m, ())
    )
    assert chain is None and "torch" not in outside[module], (
        f"{' -> '.join(chain or [module])} -> torch"
    )


def test_the_library_never_imports_the_workflow_layer(graphs):
    """Snakemake runs the library, never the reverse: no module imports snakemake, a rule script or a rule."""
    _, outside = graphs
    layer = {"snakemake", "rules", "workflow_scripts"}
    layer |= {p.stem for p in (REPO / "workflow_scripts").glob("*.py")}
    reaching = {m: sorted(names & layer) for m, names in outside.items() if names & layer}
    assert reaching == {}


# --- the walk itself, on a synthetic package ------------------------------------------------------------------


def test_lazy_imports_close_cycles_and_type_checking_imports_do_not(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import numpy\n\n\ndef f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")  # relative, a name of pkg.a
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    (pkg / "d.py").write_text("from pkg import c\nfrom pkg.sub import b\n")
    inside, outside = import_graph(tmp_path, "pkg")
    assert inside["pkg.a"] == {"pkg.sub.b"} and inside["pkg.sub.b"] == {"pkg.a"}
    assert inside["pkg.c"] == set() and inside["pkg.d"] == {"pkg.c", "pkg.sub.b"}
    assert outside["pkg.a"] == {"numpy"} and outside["pkg.c"] == {"typing"}
    assert cycles(inside) == [{"pkg.a", "pkg.sub.b"}]
    assert path_between(inside, "pkg.d", lambda m: m == "pkg.a") == ["pkg.d", "pkg.sub.b", "pkg.a"]
    assert area_graph(inside) == {
        "a": {"sub"},
        "sub": {"a"},
        "c": set(),
        "d": {"c", "sub"},
        "pkg": set(),
    }
