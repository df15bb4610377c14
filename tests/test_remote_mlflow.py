"""The pipeline against a real `mlflow server` on loopback whose artifacts live in an
S3-compatible store (moto in server mode), with the DVC remote on the same store: the run,
its metrics and images and the champion are then found through MLflow's REST API."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mnist_mlops.config import write_params
from mnist_mlops.platform.processes import start_group, stop_group, wait_http

from helpers import BIN, SMALL_MODEL, free_port

pytestmark = pytest.mark.slow

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
ARTIFACT_BUCKET, DVC_BUCKET = "mlflow-artifacts", "dvc-store"


@dataclass
class S3:
    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 on a free loopback port, in its own process group, killed at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = start_group([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, timeout=120)
        store = S3(f"http://127.0.0.1:{port}")
        for bucket in (ARTIFACT_BUCKET, DVC_BUCKET):
            store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    """`mlflow server`: runs and registry in sqlite, artifacts proxied to s3://mlflow-artifacts."""
    port = free_port()
    tmp = tmp_path_factory.mktemp("mlflow-server")
    env = {**os.environ, **CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
           "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}/mlartifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = start_group(cmd, tmp / "server.log", env, cwd=tmp)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=240, ok=lambda s: s == 200)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def api(base: str, method: str, path: str, **kw) -> dict:
    resp = httpx.request(method, f"{base}/api/2.0/mlflow/{path}", timeout=60, **kw)
    assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text[:500]}"
    return resp.json()


@pytest.mark.timeout(900)
def test_pipeline_logs_to_a_remote_mlflow_server(project, s3, mlflow_server):
    write_params(project.root, SMALL_MODEL)
    project.env.update(CREDENTIALS | {"MLFLOW_TRACKING_URI": mlflow_server})
    project.run("dvc", "remote", "add", "-d", "shared", f"s3://{DVC_BUCKET}/mnist")
    project.run("dvc", "remote", "modify", "shared", "endpointurl", s3.endpoint)
    project.run("git", "commit", "-qam", "small model, DVC remote on S3")

    proc = project.cli("run", "--no-package")
    out = proc.stdout + proc.stderr
    assert re.search(r"│ trained\s*│ yes", out) and re.search(r"│ promoted\s*│ yes", out), out[-3000:]
    assert ", pushed" in out  # the flow pushed the data it versioned to the DVC remote
    assert mlflow_server in out  # the summary points at the server's UI
    assert not (project.root / "mlflow.db").exists() and not (project.root / "mlruns").exists()

    # --- everything below goes through the server's REST API
    exp = api(mlflow_server, "GET", "experiments/get-by-name", params={"experiment_name": "mnist-convnet"})
    runs = api(mlflow_server, "POST", "runs/search", json={"experiment_ids": [exp["experiment"]["experiment_id"]]})
    assert len(runs["runs"]) == 1
    run = runs["runs"][0]
    run_id = run["info"]["run_id"]
    assert run_id in out and run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert {"test_accuracy", "test_loss", "accuracy", "val_accuracy", "loss", "val_loss"} <= metrics.keys()
    assert {f"{m}_{d}" for m in ("precision", "recall", "f1") for d in range(10)} <= metrics.keys()
    assert metrics["test_accuracy"] >= 0.5
    assert params["train.epochs"] == "1" and params["model.filters"] == "[16, 32]"
    assert tags["data.md5"].endswith(".dir")
    assert tags["data.source"].startswith("sample")
    assert len(tags["git.commit"]) == 40
    assert tags["prefect.flow_run_id"] not in ("", "none")
    curve = api(mlflow_server, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": "val_accuracy"})
    assert [m["step"] for m in curve["metrics"]] == [1]

    figures = api(mlflow_server, "GET", "artifacts/list", params={"run_id": run_id, "path": "figures"})
    names = {Path(f["path"]).name for f in figures["files"]}
    assert {"confusion_matrix.png", "misclassified.png", "learning_curves.png"} <= names
    png = httpx.get(f"{mlflow_server}/get-artifact",
                    params={"path": "figures/confusion_matrix.png", "run_uuid": run_id}, timeout=60)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    champion = api(mlflow_server, "GET", "registered-models/alias",
                   params={"name": "mnist-convnet", "alias": "champion"})["model_version"]
    assert champion["run_id"] == run_id and champion["version"] == "1"
    versions = api(mlflow_server, "GET", "model-versions/search", params={"filter": "name='mnist-convnet'"})
    assert len(versions["model_versions"]) == 1

    # the logged model carries its signature (MLmodel read back through the server)
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    info = mlflow.models.get_model_info("models:/mnist-convnet@champion")
    assert info.signature is not None
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 28, 28, 1]

    # the artifacts (figures and the model) and the DVC data really are in the object store
    artifact_keys = s3.keys(ARTIFACT_BUCKET)
    assert any(k.endswith(f"{run_id}/artifacts/figures/misclassified.png") for k in artifact_keys), artifact_keys[:20]
    assert any(k.endswith("MLmodel") for k in artifact_keys)
    assert any(k.startswith("mnist/files/md5/") for k in s3.keys(DVC_BUCKET))
