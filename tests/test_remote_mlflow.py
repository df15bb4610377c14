"""The pipeline against a real `mlflow server` as teams run it: runs and registry in
PostgreSQL, artifacts in an S3-compatible store (moto in server mode), two server workers,
and the DVC remote on the same store. The run, its metrics and images and the champion are
then found through MLflow's REST API, and a service that follows the champion serves it
from that server."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from mnist_mlops.config import write_params

from helpers import ARTIFACT_BUCKET, DVC_BUCKET, S3_CREDENTIALS, SMALL_MODEL, Mirror, npz_bytes, serving

pytestmark = pytest.mark.slow

def api(base: str, method: str, path: str, **kw) -> dict:
    resp = httpx.request(method, f"{base}/api/2.0/mlflow/{path}", timeout=60, **kw)
    assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text[:500]}"
    return resp.json()


# Secrets of the kinds a team has (issue 24): none may appear in a log line, a param or a tag.
SECRETS = {"tracking": "s3cret-track-pw", "data": "s3cret-data-pw", "signature": "s3cret-url-sig",
           "api key": "s3cret-api-key-0123456789"}


def with_credentials(url: str, user: str, password: str) -> str:
    return url.replace("http://", f"http://{user}:{password}@", 1)


def secrets_in(text: str) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret in text]


@pytest.mark.timeout(900)
def test_pipeline_logs_to_a_remote_mlflow_server(project, s3, mlflow_server, tmp_path):
    from mnist_mlops.training.data import load_sample

    write_params(project.root, [*SMALL_MODEL, "serve.follow_seconds=1"])
    # The tracking URI and the data source carry credentials (the server and the mirror ignore
    # them), the service has an API key: each must be masked wherever it is printed or recorded.
    mirror = Mirror()
    path = f"/digits.npz?X-Amz-Signature={SECRETS['signature']}&X-Amz-Expires=600"
    mirror.routes[path] = (200, npz_bytes(load_sample()), None)
    source = with_credentials(mirror.url(path), "bob", SECRETS["data"])
    project.env.update(S3_CREDENTIALS | {"MLFLOW_TRACKING_URI": with_credentials(mlflow_server, "alice",
                                                                                 SECRETS["tracking"]),
                                         "MNIST_MLOPS_API_KEY": SECRETS["api key"]})
    write_params(project.root, [f"data.source={source}"])
    project.run("dvc", "remote", "add", "-d", "shared", f"s3://{DVC_BUCKET}/mnist")
    project.run("dvc", "remote", "modify", "shared", "endpointurl", s3.endpoint)
    project.run("git", "commit", "-qam", "small model, DVC remote on S3")

    try:
        proc = project.cli("run", "--no-package")
    finally:
        mirror.close()
    out = proc.stdout + proc.stderr
    assert not secrets_in(out), [line for line in out.splitlines() if secrets_in(line)]
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
    masked = f"http://***@127.0.0.1:{mirror.server.server_address[1]}/digits.npz?X-Amz-Signature=***&X-Amz-Expires=600"
    assert tags["data.source"] == masked, tags["data.source"]
    assert params["data.source"] == tags["data.source"]
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

    # a service following the champion on that server: it serves v1, then v2 once the alias moves
    with serving(project, tmp_path / "serve", api_key=SECRETS["api key"]) as srv:
        info = srv.client.get("/model").json()
        assert (info["model_version"], info["run_id"], info["mode"]) == ("1", run_id, "follow"), info
        answer = srv.predict(np.zeros((28, 28), np.uint8).tolist())
        assert answer.status_code == 200 and answer.json()[0]["model_version"] == "1", answer.text[:300]
        api(mlflow_server, "POST", "model-versions/create",
            json={"name": "mnist-convnet", "source": champion["source"], "run_id": run_id,
                  "model_id": champion["source"].removeprefix("models:/")})
        api(mlflow_server, "POST", "registered-models/alias",
            json={"name": "mnist-convnet", "alias": "champion", "version": "2"})
        deadline = time.monotonic() + 120
        while srv.client.get("/model").json()["model_version"] != "2":
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.5)
        assert srv.predict(np.zeros((28, 28), np.uint8).tolist()).json()[0]["model_version"] == "2"
        service_log = srv.log.read_text(errors="replace")
    assert not secrets_in(service_log), [line for line in service_log.splitlines() if secrets_in(line)]

    # No secret in any param or tag of any run or version the server holds, nor in any log file.
    experiments = api(mlflow_server, "POST", "experiments/search", json={"max_results": 1000})["experiments"]
    every_run = api(mlflow_server, "POST", "runs/search",
                    json={"experiment_ids": [e["experiment_id"] for e in experiments], "max_results": 1000})["runs"]
    recorded = [f"{p['key']}={p['value']}" for r in every_run for p in r["data"].get("params", [])]
    recorded += [f"{t['key']}={t['value']}" for r in every_run for t in r["data"].get("tags", [])]
    versions = api(mlflow_server, "GET", "model-versions/search", params={"filter": "name='mnist-convnet'"})
    recorded += [f"{t['key']}={t['value']}" for v in versions["model_versions"] for t in v.get("tags", [])]
    recorded += [v.get("description", "") for v in versions["model_versions"]]
    assert len(every_run) >= 1 and any(r.startswith("data.source=") for r in recorded)
    assert not secrets_in("\n".join(recorded)), [r for r in recorded if secrets_in(r)]
    for log in [*project.root.rglob("*.log"), *tmp_path.rglob("*.log")]:
        assert not secrets_in(log.read_text(errors="replace")), log
