"""A DVC remote on S3-compatible storage (moto in server mode on loopback): the versioning
step pushes data/, and a fresh clone gets byte-identical data with `dvc pull`."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, free_port
from mnist_mlops.platform.scheduling import start_group, stop_group, wait_http

pytestmark = pytest.mark.slow

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "dvc-remote"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = start_group([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(f"{endpoint}/", proc, timeout=120)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                      if k != "AWS_DEFAULT_REGION"},
                     region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop_group(proc)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.timeout(300)
def test_push_then_pull_into_a_fresh_clone(project, s3_endpoint, tmp_path, monkeypatch):
    project.env.update(CREDENTIALS)
    project.run("dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/mnist")
    project.run("dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint)
    project.cli("fetch")

    # the flow's `version` step: dvc add data, then dvc push because a remote is configured
    project.use_env(monkeypatch)
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    from mnist_mlops.config import Paths
    from mnist_mlops.platform.versioning import version_data

    paths = Paths(project.root)
    result = version_data(paths.root, paths.data, paths.data_dvc)
    assert result.pushed and result.md5.endswith(".dir")
    project.run("git", "add", "data.dvc", ".dvc/config")
    project.run("git", "commit", "-qm", "data versioned, remote on S3")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project.root), str(clone)], check=True, timeout=120)
    assert not (clone / "data").exists()
    env = {**project.env, "MNIST_MLOPS_ROOT": str(clone), "MNIST_MLOPS_CACHE": str(tmp_path / "no-cache")}
    pulled = subprocess.run(["dvc", "pull", "data.dvc"], cwd=clone, env=env, capture_output=True, text=True, timeout=240)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert digests(clone / "data") == digests(project.root / "data")
    assert len(digests(clone / "data")) == 2
    assert not (tmp_path / "no-cache").exists()  # pulled from the remote, not fetched again
    status = subprocess.run(["dvc", "status"], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert "data.dvc" not in status.stdout, status.stdout
