"""dvc.yaml is the map of the data flow: each stage declares every module it runs and every
parameter it reads, key by key, so DVC never calls stale outputs fresh and never reruns a
stage for a parameter it does not read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from mnist_mlops.config import Params
from mnist_mlops.training.stages import STAGES

from helpers import REPO

SRC = REPO / "src"
PACKAGE = "mnist_mlops"
# Parameters no DVC stage reads, and who reads them instead.
NOT_STAGE_INPUTS = {
    **dict.fromkeys(["data.source", "data.mnist_url", "data.mnist_sha256", "data.sha256", "data.retries",
                     "data.retry_delay_seconds", "data.timeout_seconds", "data.feedback", "data.feedback_min_new",
                     "data.screen_labels", "data.trusted_sources"],
                    "the flow's fetch step (its result, data/, is the prepare stage's dependency)"),
    "evaluate.min_accuracy": "the champion gate, after the stages (a new floor re-gates, it does not re-register)",
    "evaluate.max_robust_drop": "the champion gate, after the stages (it compares with the champion)",
    "evaluate.max_foreign_drop": "the champion gate, after the stages (it compares with the champion)",
    "serve.": "the Bento build (mnist-mlops package) and `mnist-mlops serve`",
    "monitor.": "the monitor flow, which reads the prediction log, never a stage's output",
}


def module_file(name: str) -> Path:
    path = SRC / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(path: Path) -> set[str]:
    """Every `mnist_mlops` module `path` imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            for alias in node.names:  # `from mnist_mlops.training import plots` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if module_file(sub).exists() else node.module)
    return found


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)))
    return seen


def source_files(modules: set[str]) -> set[str]:
    """Module names → the paths dvc.yaml lists (package __init__ files hold no code: left out)."""
    return {module_file(m).relative_to(REPO).as_posix() for m in modules
            if not module_file(m).name == "__init__.py"}


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_package_init_files_import_nothing() -> None:
    """Leaving __init__.py out of the stage deps is safe only while they run no code."""
    for init in (SRC / PACKAGE).rglob("__init__.py"):
        body = [n for n in ast.parse(init.read_text()).body
                if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert all(isinstance(n, ast.Assign) for n in body), f"{init} runs code: list it in dvc.yaml deps"


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    runs = closure("mnist_mlops.training.stages") - {f"mnist_mlops.training.{s}" for s in STAGES}
    runs |= closure(STAGES[stage])
    declared = {d for d in dvc_stages()[stage]["deps"] if str(d).startswith("src/")}
    assert declared == source_files(runs), (
        f"dvc.yaml stage '{stage}': missing {sorted(source_files(runs) - declared)}, "
        f"not run {sorted(declared - source_files(runs))}")


def test_params_declared_key_by_key_and_each_read_somewhere() -> None:
    declared: dict[str, str] = {}
    for name, stage in dvc_stages().items():
        for key in stage.get("params", []):
            assert isinstance(key, str) and "." in key, f"stage {name}: declare params key by key, not {key!r}"
            assert key not in declared, f"{key} declared by both {declared[key]} and {name}"
            declared[key] = name
    every = set(Params().flat())
    assert set(declared) <= every, f"unknown params in dvc.yaml: {sorted(set(declared) - every)}"
    elsewhere = {k for k in every if any(k == p or (p.endswith(".") and k.startswith(p)) for p in NOT_STAGE_INPUTS)}
    assert elsewhere.isdisjoint(declared)
    assert every == set(declared) | elsewhere, f"params read by nobody: {sorted(every - set(declared) - elsewhere)}"
    assert declared["data.max_class_imbalance"] == "prepare"  # prepare validates the data too


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _lock_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]


def _lookup(raw: dict, dotted: str) -> object:
    section, _, key = dotted.partition(".")
    return raw[section][key]


@pytest.mark.parametrize("stage", list(STAGES))
def test_committed_lock_matches_the_committed_code(stage: str) -> None:
    """A fresh clone's first `make run` must not rewrite dvc.lock: every code dependency the lock
    records has the committed file's md5 and size (DVC 3 hashes the bytes as they are), the lock
    lists the deps dvc.yaml declares, and its params are params.yaml's. Cheap: no run needed."""
    locked = _lock_stages()[stage]
    code = {d["path"]: d for d in locked["deps"] if d["path"].startswith("src/")}
    declared = {d for d in dvc_stages()[stage]["deps"] if str(d).startswith("src/")}
    assert set(code) == declared, f"dvc.lock stage '{stage}' lists other deps than dvc.yaml: rerun the stage"
    stale = sorted(p for p, d in code.items()
                   if (_md5(REPO / p), (REPO / p).stat().st_size) != (d["md5"], d["size"]))
    assert not stale, (f"dvc.lock stage '{stage}' records stale md5s for {stale}: `dvc commit -f {stage}` "
                       "when the change leaves the outputs as they are, else rerun the stage")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in locked["params"]["params.yaml"].items():
        assert _lookup(raw, key) == value, f"dvc.lock stage '{stage}': {key} is {value!r}, params.yaml says otherwise"
