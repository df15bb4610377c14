"""The layout's rules, checked on the imports (cheap: no module is run).

- A wing (training/, serving/, monitoring/) imports the shared modules, records/ and platform/,
  never another wing; the shared modules, records/ and platform/ import no wing (cli.py, the
  command line, wires them all).
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


@pytest.mark.parametrize("module", [m for m in modules() if not m.endswith((".cli", ".__init__"))])
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
