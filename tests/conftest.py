"""Shared fixtures: isolated temp projects, and one trained project for the whole session.

Every test that touches state gets its own project directory with its own MLflow sqlite
store, BentoML home, Prefect home and DVC cache, so tests never see the user's state or
each other's. Training is expensive, so `trained_project` trains once (one short epoch)
and is shared read-mostly by every test that needs a champion.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["params.yaml", "dvc.yaml", "data.dvc", ".dvc/config", ".dvc/.gitignore",
                 ".dvcignore", ".gitignore", "bentofile.yaml", "prefect.yaml", "src", "pipelines"]
FAST_PARAMS = ["train.epochs=1", "evaluate.min_accuracy=0.5"]

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}
os.environ.update(TELEMETRY_OFF)
# MLflow's set_tracking_uri/set_registry_uri/set_experiment also write these into
# os.environ "so that subprocesses inherit them": they must never leak between tests.
MLFLOW_PROCESS_STATE = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
                        "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _isolate_mlflow_globals() -> Iterator[None]:
    """Undo what a test did to MLflow's process-wide state (URIs, experiment, active runs)."""
    saved = {key: os.environ.get(key) for key in MLFLOW_PROCESS_STATE}
    yield
    if "mlflow" in sys.modules:
        import mlflow
        from mlflow.tracking import _model_registry, _tracking_service, fluent

        while mlflow.active_run():
            mlflow.end_run()
        _tracking_service.utils._tracking_uri = None
        _model_registry.utils._registry_uri = None
        fluent._active_experiment_id = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Project:
    """A throw-away copy of the project: its own git repo, stores and environment."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
        """Run a command (e.g. `mnist-mlops run`) in the project, as a user would."""
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                                 f"\n--- stderr\n{proc.stderr[-6000:]}")
        return proc

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "mnist-mlops"), *args, **kw)

    def mlflow_client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"],
                                   registry_uri=self.env["MLFLOW_TRACKING_URI"])

    def use_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point this test process at the project's stores (for in-process API calls)."""
        for key in ("MLFLOW_TRACKING_URI", "BENTOML_HOME", "PREFECT_HOME", "MNIST_MLOPS_ROOT",
                    "MNIST_MLOPS_CACHE"):
            monkeypatch.setenv(key, self.env[key])
        monkeypatch.chdir(self.root)


def make_project(dest: Path, params: list[str] | None = None) -> Project:
    """Copy the project's tracked files into `dest`, git-init it, and isolate its stores."""
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
    inherited = {k: v for k, v in os.environ.items() if k not in MLFLOW_PROCESS_STATE}
    env = {
        **inherited,
        **TELEMETRY_OFF,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}",
        "BENTOML_HOME": str(dest / ".bentoml"),
        "PREFECT_HOME": str(dest / ".prefect"),
        "MNIST_MLOPS_ROOT": str(dest),
        "MNIST_MLOPS_CACHE": str(dest / ".cache"),
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("PREFECT_API_URL", "MNIST_MLOPS_API_KEY"):
        env.pop(key, None)
    project = Project(dest, env)
    project.run("git", "init", "-q", "-b", "main")
    project.run("git", "config", "user.email", "test@example.invalid")
    project.run("git", "config", "user.name", "test")
    if params:
        from mnist_mlops.config import write_params

        write_params(dest, params)
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "test project")
    return project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A fresh, untrained project with fast params (one epoch)."""
    return make_project(tmp_path / "project", FAST_PARAMS)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """One project trained once by the real flow (`mnist-mlops run`, one epoch) per session."""
    proj = make_project(tmp_path_factory.mktemp("trained") / "project", FAST_PARAMS)
    proc = proj.cli("run")
    proj.first_run_output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proj


class Server:
    """A running `mnist-mlops serve` (→ `bentoml serve`) in its own process group."""

    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM the whole group (BentoML's workers too), SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


@contextlib.contextmanager
def serving(project: Project, workdir: Path, api_key: str | None = None,
            ready_timeout: float = 300) -> Iterator[Server]:
    """`mnist-mlops serve` on 127.0.0.1 and a free port, as a user starts it, until /readyz."""
    import httpx

    port = free_port()
    log = workdir / f"serve-{port}.log"
    env = {**project.env, **({"MNIST_MLOPS_API_KEY": api_key} if api_key else {})}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "mnist-mlops"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=project.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the service exited {proc.returncode} before it was ready:\n{srv.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"the service was not ready within {ready_timeout:.0f} s:\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def served(trained_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The trained project's champion served once for the whole session (no API key)."""
    with serving(trained_project, tmp_path_factory.mktemp("served")) as srv:
        yield srv
