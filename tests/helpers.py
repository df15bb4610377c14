"""The test suite's one shared utility module: throw-away projects and served champions.

Everything here is plain code (no pytest fixtures: those live in tests/conftest.py).
Test modules import it as `from helpers import ...` (pytest puts tests/ on sys.path).
Helper processes are started and stopped with the project's own
`mnist_mlops.platform.processes` (own process group, stopped as a group, never outliving
the test process), so a test never needs a process stopper of its own.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from mnist_mlops.errors import UserError
from mnist_mlops.platform.processes import LOOPBACK, free_port, start_group, stop_group, wait_http
from mnist_mlops.platform.tracking import TELEMETRY_OFF

__all__ = ["ARTIFACT_BUCKET", "BIN", "DVC_BUCKET", "S3", "S3_CREDENTIALS", "FAST_PARAMS", "LOOPBACK",
           "MLFLOW_PROCESS_STATE", "PROJECT_FILES", "REPO", "SMALL_MODEL", "TELEMETRY_OFF", "Postgres", "Project",
           "Mirror", "Server", "blended_batch", "copy_project", "free_port", "kill_all", "log_keras", "make_project",
           "npz_bytes", "left_behind", "postgres_cluster", "prepared_digits", "processes_with", "serving",
           "wait_stopped", "start_server", "stop_group", "train_reader"]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["params.yaml", "dvc.yaml", "data.dvc", "requirements.lock", ".dvc/config", ".dvc/.gitignore",
                 ".dvcignore", ".gitignore", "bentofile.yaml", "prefect.yaml", "src", "pipelines"]
# One epoch learns little through augmentation: the tests of the pipeline train on the digits as
# they are (augmentation has its own tests: determinism in test_pipeline, the robustness slice).
# Nor do they screen labels: a one-epoch champion (86% of the test digits) would quarantine
# honest ones at random; test_screening.py screens with a champion that reads well.
FAST_PARAMS = ["train.epochs=1", "evaluate.min_accuracy=0.5", "prepare.robust_digits=20", "augment.enabled=false",
               "foreign.digits=20", "foreign.train_digits=20", "data.screen_labels=false"]
# The pipeline is under test, not the model: a small ConvNet keeps each training short.
SMALL_MODEL = ["model.filters=[16,32]", "model.convs_per_block=1", "model.dense_units=64", "model.batch_norm=false",
               "evaluate.misclassified_grid=9"]

# MLflow's set_tracking_uri/set_registry_uri/set_experiment also write these into
# os.environ "so that subprocesses inherit them": they must never leak between tests.
MLFLOW_PROCESS_STATE = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
                        "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


# --------------------------------------------------------------------------- projects


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

    def use_env(self, monkeypatch) -> None:
        """Point this test process at the project's stores (for in-process API calls)."""
        for key in ("MLFLOW_TRACKING_URI", "BENTOML_HOME", "PREFECT_HOME", "MNIST_MLOPS_ROOT",
                    "MNIST_MLOPS_CACHE"):
            monkeypatch.setenv(key, self.env[key])
        monkeypatch.chdir(self.root)


def _store_env(dest: Path) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}",
        "BENTOML_HOME": str(dest / ".bentoml"),
        "PREFECT_HOME": str(dest / ".prefect"),
        "MNIST_MLOPS_ROOT": str(dest),
        "MNIST_MLOPS_CACHE": str(dest / ".cache"),
    }


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
        **_store_env(dest),
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("PREFECT_API_URL", "MNIST_MLOPS_API_KEY", "MNIST_MLOPS_PREDICTION_LOG", "MNIST_MLOPS_FEEDBACK"):
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


def copy_project(project: Project, dest: Path, prefect_api: str | None = None) -> Project:
    """A private copy of a (trained) project with its own stores: to change without sharing.

    Its MLflow runs keep their artifact URIs, i.e. they still point into the original's
    artifact store; that store is only read (model loads), never written, by a copy.
    `prefect_api`: the copy's flows report to that Prefect server (the suite's shared one)
    instead of one its commands start (see the `project` fixture).
    """
    shutil.copytree(project.root, dest, symlinks=True)
    env = {**project.env, **_store_env(dest)}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return Project(dest, env)


def log_keras(model, **kwargs):
    """`mlflow.keras.log_model` to the active run with the requirements stated, as the evaluate
    stage logs: left to infer them, MLflow loads the model again in a fresh subprocess that
    imports TensorFlow, ~7 s a model on 2 cores, and the gate tests log dozens."""
    import keras
    import mlflow
    import tensorflow as tf

    requirements = [f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"]
    return mlflow.keras.log_model(model, name="model", pip_requirements=requirements, **kwargs)


def prepared_digits(project: Project, split: str):
    """A trained project's prepared split (`train`, `val`, `test`) as uint8 28×28 digits and labels."""
    import numpy as np

    root = project.root / "artifacts" / "prepared"
    x = np.rint(np.load(root / f"{split}_x.npy")[..., 0] * 255).astype(np.uint8)
    return x, np.load(root / f"{split}_y.npy")


def blended_batch(project: Project):
    """200 test digits the champion never trained on; the last 20 are two digits of different
    classes blended half and half (a question only a person can answer)."""
    import numpy as np

    x, y = prepared_digits(project, "test")
    order = np.random.default_rng(7).permutation(len(y))
    clear, rest = order[:180], order[180:]
    firsts = rest[:20]
    seconds = [next(j for j in rest[20 + 7 * k:] if y[j] != y[i]) for k, i in enumerate(firsts)]
    blends = ((x[firsts].astype(np.float32) + x[seconds]) / 2).astype(np.uint8)
    return np.concatenate([x[clear], blends])


def train_reader(project: Project):
    """A small ConvNet trained four epochs on the project's base train split, in this process.

    Screening labels and ranking questions judge a model's probabilities: the session's
    one-epoch champion reads 86% of digits and is unsure of nearly all of them (top
    probabilities around 0.3), so the tests of those use this one instead (~95%)."""
    import keras

    from mnist_mlops.config import load_params
    from mnist_mlops.preprocess import normalize
    from mnist_mlops.training.model import build_model

    keras.utils.set_random_seed(7)
    model = build_model(load_params(project.root, SMALL_MODEL).model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = prepared_digits(project, "train")
    model.fit(normalize(x), y, epochs=4, batch_size=64, verbose=0)
    return model


# --------------------------------------------------------------------------- servers


class Mirror:
    """A local stand-in for the MNIST mirror: path → (status, body, advertised length)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, int | None]] = {}
        self.hits: dict[str, int] = {}
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                mirror.hits[self.path] = mirror.hits.get(self.path, 0) + 1
                status, body, length = mirror.routes.get(self.path, (404, b"not found", None))
                self.send_response(status)
                self.send_header("Content-Length", str(length if length is not None else len(body)))
                self.end_headers()
                self.wfile.write(body)  # a shorter body than advertised = a truncated download

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()




@dataclass
class Server:
    """A server the test started (`mnist-mlops serve`, `schedule`, ...) in its own process group.

    `proc` is the group's leader (the project's supervisor process); `stop()` ends the
    whole group. `key` is the API key the server was started with, if any; `client` is an
    httpx client on `url` that sends it.
    """

    url: str
    proc: subprocess.Popen
    log: Path
    key: str | None = None
    _client: object | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])

    @property
    def client(self):
        import httpx

        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=60,
                                        headers={"X-API-Key": self.key} if self.key else {})
        return self._client

    def predict(self, images, **kw):
        return self.client.post("/predict", json={"images": images}, **kw)

    def predict_image(self, data: bytes, name: str = "digit.png"):
        return self.client.post("/predict_image", files={"image": (name, data)})

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the whole group (BentoML's workers too), SIGKILL what is left."""
        if self._client is not None:
            self._client.close()
            self._client = None
        stop_group(self.proc, timeout)


def start_server(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, ready: str,
                 timeout: float = 300, ok: Callable[[int], bool] = lambda status: status == 200,
                 url: str | None = None, key: str | None = None) -> Server:
    """Start `cmd` in its own process group and wait until `ready` answers `ok`; else stop it and fail."""
    if url is None:
        parts = urlsplit(ready)
        url = f"{parts.scheme}://{parts.netloc}"
    proc = start_group(cmd, log, env, cwd=cwd)
    server = Server(url, proc, log, key)
    try:
        wait_http(ready, proc, timeout, ok)
    except UserError as exc:
        server.stop()
        raise AssertionError(f"{' '.join(cmd[:2])}: {exc}\n--- log\n{server.log_tail()}") from None
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def serving(project: Project, workdir: Path, api_key: str | None = None, ready_timeout: float = 300,
            extra_args: list[str] | None = None, records_in_project: bool = False) -> Iterator[Server]:
    """`mnist-mlops serve` on 127.0.0.1 and a free port, as a user starts it, until /readyz.

    The prediction log and the labels it takes go to `workdir` (a shared project stays read
    only), or to the project's own logs/ and feedback/ with `records_in_project`.
    """
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = {**project.env, **({"MNIST_MLOPS_API_KEY": api_key} if api_key else {})}
    if not records_in_project:
        env |= {"MNIST_MLOPS_PREDICTION_LOG": str(workdir / "predictions"),
                "MNIST_MLOPS_FEEDBACK": str(workdir / "feedback")}
    cmd = [str(BIN / "mnist-mlops"), "serve", "--host", LOOPBACK, "--port", str(port), *(extra_args or [])]
    srv = start_server(cmd, project.root, env, workdir / f"serve-{port}.log", f"{url}/readyz", ready_timeout,
                       url=url, key=api_key)
    try:
        yield srv
    finally:
        srv.stop()


def page_text(browser, url: str, *needles: str, timeout: float = 120) -> str:
    """Open `url` in the browser and wait until the page shows every needle; the page's text."""
    browser.get(url)
    return wait_text(browser, *needles, timeout=timeout)


def click_text(browser, text: str, timeout: float = 60) -> None:
    """Click the innermost element whose whole text is `text` (a tab, a button)."""
    deadline = time.monotonic() + timeout
    script = """const want = arguments[0];
        const el = [...document.querySelectorAll('button, a, [role=tab], li, span, div')].reverse()
            .find(e => e.textContent.trim() === want);
        if (el) { el.click(); return true; } return false;"""
    while not browser.execute_script(script, text):
        assert time.monotonic() < deadline, f"nothing to click named {text!r}"
        time.sleep(1)


def wait_text(browser, *needles: str, timeout: float = 90) -> str:
    """Wait until the current page shows every needle; the page's text."""
    deadline = time.monotonic() + timeout
    while True:
        body = browser.find_element("tag name", "body").text
        if all(n in body for n in needles) or time.monotonic() > deadline:
            return body
        time.sleep(1)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (`postgres_cluster`); one database per user of it."""

    port: int
    user: str
    proc: subprocess.Popen
    log: Path

    def dsn(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@{LOOPBACK}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its `postgresql://` URL."""
        import psycopg

        conn = psycopg.connect(host=LOOPBACK, port=self.port, user=self.user, dbname="postgres", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.dsn(name)


def postgres_bindir() -> Path:
    """Debian's PostgreSQL server binaries (`apt-get install postgresql`; not on PATH there)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise AssertionError("PostgreSQL's initdb not found: `apt-get install postgresql` (.ci/run does it)")
    return versions[-1].parent


@contextlib.contextmanager
def postgres_cluster(user: str = "mnist") -> Iterator[Postgres]:
    """initdb in a temp dir, `postgres` on a free 127.0.0.1 port (supervised: it dies with this
    process), removed afterwards. PostgreSQL refuses to run as root: as root, the cluster belongs
    to Debian's `postgres` account. Trust auth on loopback only; fsync off (it is thrown away)."""
    bindir = postgres_bindir()
    tmp = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("postgres")
        os.chown(tmp, owner.pw_uid, owner.pw_gid)
        as_owner = ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--init-groups"]
    data, log = tmp / "data", tmp / "postgres.log"  # the server's output (it logs to stderr)
    try:
        subprocess.run([*as_owner, str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust",
                        "-E", "UTF8", "--no-sync", "--no-instructions"], check=True, capture_output=True,
                       text=True, timeout=120, cwd=tmp)
        port = free_port()
        cmd = [*as_owner, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", LOOPBACK,
               "-k", str(tmp), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
               "-c", "max_connections=200"]
        proc = start_group(cmd, log, cwd=tmp)
        cluster = Postgres(port, user, proc, log)
        try:
            _wait_postgres(cluster)
            yield cluster
        finally:
            stop_group(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_postgres(cluster: Postgres, timeout: float = 60) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(host=LOOPBACK, port=cluster.port, user=cluster.user, dbname="postgres",
                             connect_timeout=2).close()
            return
        except psycopg.OperationalError as exc:
            if cluster.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL did not start: {exc}\n"
                                     f"{cluster.log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.3)


# --------------------------------------------------------------------------- S3 (moto)

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
ARTIFACT_BUCKET, DVC_BUCKET = "mlflow-artifacts", "dvc-store"


@dataclass
class S3:
    """moto's S3 server (the `s3` fixture): an S3-compatible object store on loopback."""

    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


# --------------------------------------------------------------------------- data


def npz_bytes(digits) -> bytes:
    """Digits (`training.data.Digits`) as a Keras-style .npz, as a mirror would publish them."""
    import io

    import numpy as np

    buf = io.BytesIO()
    n = len(digits.labels) * 4 // 5
    np.savez(buf, x_train=digits.images[:n], y_train=digits.labels[:n],
             x_test=digits.images[n:], y_test=digits.labels[n:])
    return buf.getvalue()


def processes_with(marker: str) -> list[int]:
    """Pids whose environment carries `MNIST_MLOPS_TEST_MARKER=marker`: every descendant of a
    command we started with it, wherever it moved (its own session, reparented to init)."""
    pids = []
    needle = f"MNIST_MLOPS_TEST_MARKER={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_all(marker: str) -> None:
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_stopped(proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Wait for a signalled command to exit; past `timeout`, fail with the end of its output."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} ignored for {timeout:g} s\n{log.read_text(errors='replace')[-3000:]}") from None


def left_behind(proc: subprocess.Popen, marker: str) -> list[int]:
    """Stop the command's group for good, then the pids of its processes still alive (killed too)."""
    stop_group(proc, 10)
    time.sleep(1)
    left = processes_with(marker)
    kill_all(marker)
    return left
