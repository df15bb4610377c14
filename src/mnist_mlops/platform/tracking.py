"""MLflow set-up shared by the steps: tracking URI, experiment, run tags."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from mnist_mlops import redact
from mnist_mlops.config import MODEL_NAME, Paths, tracking_uri
from mnist_mlops.errors import UserError

EXPERIMENT = MODEL_NAME
MONITORING_EXPERIMENT = "mnist-monitoring"  # the monitor's checks, one run per window
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
SYSTEM_METRICS_INTERVAL_S = 5  # CPU, memory (GPU on GPU hosts) while training; MLflow's default is 10
FLOW_RUN_ENV = "MNIST_MLOPS_FLOW_RUN_ID"
# Set by a sweep: the training run becomes a nested child of this (active) MLflow run.
PARENT_RUN_ENV = "MNIST_MLOPS_PARENT_RUN_ID"
# What a training run is called: TRIGGER_ENV (set by the flow: manual, schedule, monitor, sweep)
# names it with its data version; RUN_NAME_ENV (a sweep candidate) names it outright.
TRIGGER_ENV = "MNIST_MLOPS_TRIGGER"
RUN_NAME_ENV = "MNIST_MLOPS_RUN_NAME"
# Which process runs a training: a run left RUNNING by a dead process is closed as KILLED.
TAG_HOST = "process.host"
TAG_PID = "process.pid"


# Every library's telemetry off, TensorFlow's C++ chatter down (the tests use the same set).
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def quiet_env() -> None:
    """Telemetry off and TensorFlow's C++ chatter down, before the heavy imports."""
    for key, value in {
        **TELEMETRY_OFF,
        "GIT_PYTHON_REFRESH": "quiet",
        # no "Downloading artifacts" bars when the gate loads registered models
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # MLflow's HTTP client retries for ~4 minutes by default (7 retries, backoff 2): an
        # unreachable server should fail the run in seconds; the flow retries the check itself.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        # Prefect's temporary server gets 20 s to start: a loaded machine needs more.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }.items():
        os.environ.setdefault(key, value)


def setup_mlflow(root: Path, experiment_name: str = EXPERIMENT) -> str:
    """Point MLflow at the project's store (or $MLFLOW_TRACKING_URI) and an experiment
    (the training runs' by default; the monitor has its own)."""
    import mlflow

    uri = tracking_uri(root)
    # MLflow prints "View run … at <tracking URI>" as each run ends, credentials and all; the
    # summary gives the same link masked (this process and the stages it starts).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.set_experiment(experiment_name)
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise UserError(f"MLflow tracking server {redact.url(uri)} unreachable ({redact.text(reason(exc))}): "
                        "start it or fix MLFLOW_TRACKING_URI") from None
    mark_model_training(experiment)
    return uri


def mark_model_training(experiment) -> None:
    """Tag an experiment as model training, so MLflow 3's UI opens it on the runs table
    (its GenAI views, traces and LLM dashboards, are empty for this project)."""
    import mlflow

    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def runs_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI's runs table of an experiment, in model-training mode."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def project_runs_url(root: Path, ui: str | None = None) -> str:
    """The runs table of the project's experiment: on the tracking server, or on `ui`
    (where `mnist-mlops ui` serves a local store)."""
    import mlflow

    uri = setup_mlflow(root)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    return runs_url(ui or redact.without_credentials(uri), experiment.experiment_id)


def reason(exc: BaseException) -> str:
    """The cause of a failed MLflow call in a few words (its own message is a page long)."""
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "unknown host"),
                          ("Max retries exceeded", "no answer after retries")):
        if needle in text:
            return short
    return first_line(exc)


def close_stale_runs() -> list[str]:
    """Mark KILLED the runs a killed training left RUNNING (same host, process gone).

    Only runs this machine started are touched, and only when the process that started
    them is dead, so runs of other machines sharing a tracking server are left alone.
    """
    import mlflow
    import psutil

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    closed = []
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'", max_results=200)
    for run in runs:
        tags = run.data.tags
        if tags.get(TAG_HOST) != socket.gethostname() or not tags.get(TAG_PID, "").isdigit():
            continue
        pid = int(tags[TAG_PID])
        try:
            alive = psutil.Process(pid).create_time() * 1000 <= run.info.start_time + 1000
        except psutil.Error:
            alive = False
        if not alive:
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def first_line(exc: BaseException, named: bool = False) -> str:
    """An exception in one line: its message's first (300 characters at most), else its type;
    `named`: the type, then the message."""
    text = str(exc).strip().splitlines()
    if not text:
        return exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text[0][:300]}" if named else text[0][:300]


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def training_run_name(paths: Paths) -> str:
    """`manual · data a9f0bd22`, as Prefect names the flow run: what started the training and the
    data version it trained on, so the MLflow runs table reads without opening each run (MLflow
    would pick a random `marvelous-goat-45`). A sweep candidate: `sweep · candidate-0 · k=v`."""
    from mnist_mlops.platform.versioning import dvc_md5

    if name := os.environ.get(RUN_NAME_ENV):
        return name
    md5 = dvc_md5(paths.data_dvc) or "untracked"
    return f"{os.environ.get(TRIGGER_ENV) or 'dvc repro'} · data {md5[:8]}"


def run_tags(paths: Paths, source: str) -> dict[str, str]:
    """Lineage tags every training run carries: data version, source, code, flow run."""
    from mnist_mlops.platform.versioning import dvc_md5

    return {
        "data.md5": dvc_md5(paths.data_dvc) or "untracked",
        "data.source": redact.url(source),
        "git.commit": git_commit(paths.root),
        "prefect.flow_run_id": os.environ.get(FLOW_RUN_ENV, "none"),
        TAG_HOST: socket.gethostname(),
        TAG_PID: str(os.getpid()),
    }
