"""Helpers shared by the benchmarks: quiet environment, temp projects, rich tables.

Not a test module: the benchmarks are separate from `make test` and nothing here asserts
a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "BENTOML_DO_NOT_TRACK": "true",
         "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
         "GIT_PYTHON_REFRESH": "quiet"}
os.environ.update(QUIET)
# The project files a user's checkout holds (as tests/conftest.py copies them).
PROJECT_FILES = ["params.yaml", "dvc.yaml", "data.dvc", "requirements.lock", ".dvc/config", ".dvc/.gitignore",
                 ".dvcignore", ".gitignore", "bentofile.yaml", "prefect.yaml", "src", "pipelines"]


def project_env(root: Path) -> dict[str, str]:
    """The isolated environment of a temp project: its own MLflow, BentoML, Prefect, cache."""
    env = {
        **os.environ,
        **QUIET,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "BENTOML_HOME": str(root / ".bentoml"),
        "PREFECT_HOME": str(root / ".prefect"),
        "MNIST_MLOPS_ROOT": str(root),
        "MNIST_MLOPS_CACHE": str(root / ".cache"),
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("PREFECT_API_URL", "MNIST_MLOPS_API_KEY", "MNIST_MLOPS_PARENT_RUN_ID"):
        env.pop(key, None)
    return env


def make_project(dest: Path, overrides: list[str] | None = None) -> dict[str, str]:
    """Copy the project's files into `dest`, git-init + commit it; return its environment."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if not src.exists():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, target)
    env = project_env(dest)
    git = ["git", "-c", "user.email=bench@example.invalid", "-c", "user.name=bench"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=dest, env=env, check=True)
    if overrides:
        from mnist_mlops.config import write_params

        write_params(dest, overrides)
    subprocess.run([*git, "add", "-A"], cwd=dest, env=env, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "bench project"], cwd=dest, env=env, check=True)
    return env


def prepared_root(root: Path):
    """Fetch the offline sample and prepare its splits under `root` (no DVC, no MLflow)."""
    from mnist_mlops.config import Params, Paths
    from mnist_mlops.training.data import fetch
    from mnist_mlops.training.prepare import prepare

    params = Params()
    paths = Paths(root)
    fetch(params.data, paths.data, paths.cache)
    sizes = prepare(paths, params)
    return paths, sizes


def champion_and_data(root: Path):
    """A trained project's champion version, params, base digits and their split rows
    (`{"train": ..., "val": ..., "test": ...}`), as the stages split them; None (said on
    stderr) when the project has no champion yet."""
    from mnist_mlops import registry
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.platform.tracking import setup_mlflow
    from mnist_mlops.splits import stratified_split
    from mnist_mlops.training.data import read_data

    paths, params = Paths(root), load_params(root)
    setup_mlflow(root)
    champion = registry.champion_version()
    if champion is None:
        print("no champion: run `make run` first", file=sys.stderr)
        return None
    data = read_data(paths.data)
    return champion, params, data, stratified_split(data.labels, params.prepare)


def ratio_cell(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return f"[{'green' if ok else 'red'}]{value:.2f}[/]"


def met(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "[green]met[/]" if ok else "[red]not met[/]"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=max(100, shutil.get_terminal_size((140, 20)).columns)).print(table)
