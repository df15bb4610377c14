"""The layout's rules, checked on the imports (cheap: no module is run).

- A wing (training/, serving/, monitoring/) imports the shared modules, records/ and platform/,
  never another wing; the shared modules, records/ and platform/ import no wing (cli.py and commands/, the
  command line, wire them all).
- The Bento holds every module its service imports (bentofile.yaml's `include:`).
"""

from __future__ import annotations

import pytest
import yaml
from pathspec import PathSpec
from test_stages import PACKAGE, SRC, closure, imported_modules, module_file

from helpers import REPO

WINGS = ("training", "serving", "monitoring")
# Crossings that predate this test, named so that no new one slips in. The monitor reads the
# fetched data and the labels the way training does (training/data.py, training/fetch.py).
KNOWN = {"mnist_mlops.monitoring.check": {"mnist_mlops.training.data", "mnist_mlops.training.fetch"}}


def wing(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else None


def modules() -> list[str]:
    return sorted(".".join(p.relative_to(SRC).with_suffix("").parts) for p in (SRC / PACKAGE).rglob("*.py"))


@pytest.mark.parametrize("module", [m for m in modules() if not m.endswith((".cli", ".__init__"))
                                    and not m.startswith("mnist_mlops.commands.")])
def test_a_module_imports_no_other_wing(module: str) -> None:
    own = wing(module)
    crossing = sorted(m for m in imported_modules(module_file(module)) - KNOWN.get(module, set())
                      if wing(m) not in (None, own))
    assert not crossing, f"{module} imports {crossing}: only shared modules, records/ and platform/ may be"


def test_the_bento_includes_every_module_the_service_imports() -> None:
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    service = bentofile["service"].split(":")[0]
    files = {module_file(m).relative_to(SRC).as_posix() for m in closure(service)}
    packages = {f.rsplit("/", 1)[0] + "/__init__.py" for f in files}
    included = PathSpec.from_lines("gitwildmatch", bentofile["include"])  # BentoML's own matching
    missing = sorted(f for f in files | packages if not included.match_file(f))
    assert not missing, f"bentofile.yaml's include: misses {missing}"


# --------------------------------------------------------------------------- sizes and the map

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50
SERVICE_LINES = 250  # service.py is the wiring: the class and its APIs, everything else imported


def code_files() -> list:
    return sorted([*(SRC / PACKAGE).rglob("*.py"), *(REPO / "pipelines").rglob("*.py")])


def test_no_module_outgrows_its_room() -> None:
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in code_files()}
    assert sizes["src/mnist_mlops/serving/service.py"] <= SERVICE_LINES, sizes["src/mnist_mlops/serving/service.py"]
    big = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_no_function_is_longer_than_a_screen() -> None:
    import ast

    long = []
    for path in code_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO).as_posix()}::{node.name} ({lines})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_readme_layout_names_every_module() -> None:
    """The README's Layout block has a line for each module of src/ and pipelines/ (by its file
    name, under its folder), so a newcomer finds every room on the map."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named = {line.split()[0] for line in block.splitlines() if line.strip()}
    missing = sorted(p.relative_to(REPO).as_posix() for p in code_files()
                     if p.name != "__init__.py" and p.name not in named)
    assert not missing, f"README.md's Layout misses {missing}"
