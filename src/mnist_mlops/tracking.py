"""MLflow set-up shared by the steps: tracking URI, experiment, run tags."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mnist_mlops.config import MODEL_NAME, Paths, tracking_uri
from mnist_mlops.errors import UserError

EXPERIMENT = MODEL_NAME
FLOW_RUN_ENV = "MNIST_MLOPS_FLOW_RUN_ID"


def quiet_env() -> None:
    """Telemetry off and TensorFlow's C++ chatter down, before the heavy imports."""
    for key, value in {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "BENTOML_DO_NOT_TRACK": "true",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "GIT_PYTHON_REFRESH": "quiet",
    }.items():
        os.environ.setdefault(key, value)


def setup_mlflow(root: Path) -> str:
    """Point MLflow at the project's store (or $MLFLOW_TRACKING_URI) and its experiment."""
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        mlflow.set_experiment(EXPERIMENT)
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise UserError(f"MLflow tracking server {uri} unreachable: {first_line(exc)}") from None
    return uri


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_tags(paths: Paths, source: str) -> dict[str, str]:
    """Lineage tags every training run carries: data version, source, code, flow run."""
    from mnist_mlops.data import dvc_md5

    return {
        "data.md5": dvc_md5(paths.data_dvc) or "untracked",
        "data.source": source,
        "git.commit": git_commit(paths.root),
        "prefect.flow_run_id": os.environ.get(FLOW_RUN_ENV, "none"),
    }
