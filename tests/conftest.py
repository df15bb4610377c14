"""Fixtures only (plain helpers are in tests/helpers.py): isolated temp projects, one
trained project and one served champion for the whole session.

Every test that touches state gets its own project directory with its own MLflow sqlite
store, BentoML home, Prefect home and DVC cache, so tests never see the user's state or
each other's.

Training is expensive, so `trained_project` trains once per session and is shared. What
every test may rely on, from the first test that uses it to the last:

- it was made by `make_project(..., FAST_PARAMS)` and one `mnist-mlops run` (one epoch);
  `first_run_output` holds that run's stdout + stderr;
- its MLflow store holds exactly one run, and the registry one version of the model,
  "1", trained by that run, with the champion alias on it; its BentoML store holds that champion's Bento;
- data/ matches data.dvc, which is as committed; dvc.lock matches params.yaml and the
  stage outputs (`dvc status` is clean).

So nothing may write to it: tests only read its files and stores, serve its Bento (the
`served` fixture, or `helpers.serving` with a log outside the project) and call its
read-only commands (`mnist-mlops predict`, `dvc status`, `dvc metrics show`, `dvc plots
show -o` elsewhere). A test that runs the pipeline again, changes params or data, or
touches the registry works on `helpers.copy_project(trained_project, tmp_path / ...)`
(seconds) or on its own `project` (a fresh, untrained one).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    ARTIFACT_BUCKET,
    BIN,
    DVC_BUCKET,
    FAST_PARAMS,
    LOOPBACK,
    MLFLOW_PROCESS_STATE,
    S3,
    S3_CREDENTIALS,
    TELEMETRY_OFF,
    Postgres,
    Project,
    Server,
    free_port,
    make_project,
    postgres_cluster,
    serving,
    start_server,
    train_reader,
)

os.environ.update(TELEMETRY_OFF)


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


@pytest.fixture
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Project:
    """A fresh, untrained project with fast params (one epoch).

    In a `slow` test its flows report to the suite's shared Prefect server (`PREFECT_API_URL`,
    as on a team's machine), so its commands start no Prefect server of their own: a server
    started on a fresh project's database migrates it first, ~20 CPU-seconds of a 2-core
    machine per project (measured), for what `trained_project` and the `own_prefect` tests
    already cover. A test about the server a command starts itself is marked `own_prefect`.
    """
    proj = make_project(tmp_path / "project", FAST_PARAMS)
    if request.node.get_closest_marker("slow") and not request.node.get_closest_marker("own_prefect"):
        proj.env["PREFECT_API_URL"] = request.getfixturevalue("prefect_server")
    return proj


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """One project trained once by the real flow (`mnist-mlops run`, one epoch) per session: read only."""
    proj = make_project(tmp_path_factory.mktemp("trained") / "project", FAST_PARAMS)
    proc = proj.cli("run")
    proj.first_run_output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proj


@pytest.fixture(scope="session")
def served(trained_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The trained project's champion served once for the whole session (no API key)."""
    with serving(trained_project, tmp_path_factory.mktemp("served")) as srv:
        yield srv


@pytest.fixture(scope="session")
def reader(trained_project: Project):
    """A Keras ConvNet that reads well (`helpers.train_reader`), trained once per session: for
    the tests whose subject is a good model's probabilities (label screening, the queue)."""
    return train_reader(trained_project)


CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian Chromium through Selenium, one per test module, with a fresh profile and
    console logs on (the drawing page, the MLflow UI, the Prefect UI)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: install them with "
                    "`apt-get install chromium chromium-driver` (.ci/run does it)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                f"--user-data-dir={profile}", "--window-size=900,1200"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # console, requests
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway PostgreSQL cluster for the session; each user creates its own database."""
    with postgres_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """moto's S3 on a free loopback port with the MLflow artifact and DVC buckets."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    srv = start_server([str(BIN / "moto_server"), "-H", LOOPBACK, "-p", str(port)], Path.cwd(), dict(os.environ),
                       tmp_path_factory.mktemp("moto") / "moto.log", f"{url}/", timeout=120)
    try:
        store = S3(url)
        for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
            store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def mlflow_server(s3: S3, postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` as a team runs it: runs and registry in PostgreSQL, artifacts proxied to
    s3://mlflow-artifacts, two workers (two requests of one run may reach different processes).
    Shared: tests that use it find each other's runs and versions and must count, not assume."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("mlflow-server")
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_PROCESS_STATE}
    # no GenAI job runners (huey consumers): nothing here uses them, and they poll all session
    env |= {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres.create_database("mlflow"),
           "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/mlartifacts",
           "--host", LOOPBACK, "--port", str(port), "--workers", "2"]
    url = f"http://{LOOPBACK}:{port}"
    srv = start_server(cmd, tmp, env, tmp / "server.log", f"{url}/health", timeout=240)
    try:
        yield url
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def prefect_server(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` on PostgreSQL (asyncpg), on loopback: its API URL. Shared like
    `mlflow_server`."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("prefect-server")
    url = f"http://{LOOPBACK}:{port}"
    postgres.create_database("prefect")
    env = {**os.environ, "PREFECT_HOME": str(tmp), "PREFECT_UI_API_URL": f"{url}/api",
           "PREFECT_API_DATABASE_CONNECTION_URL": postgres.dsn("prefect", driver="postgresql+asyncpg")}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port)]
    srv = start_server(cmd, tmp, env, tmp / "server.log", f"{url}/api/health", timeout=300)
    try:
        yield f"{url}/api"
    finally:
        srv.stop()
