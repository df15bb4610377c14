"""A DVC remote on S3-compatible storage (moto in server mode on loopback): the versioning
step pushes data/, and a fresh clone gets byte-identical data with `dvc pull`, read from
the bucket (moto's request log) into the clone's empty DVC cache."""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mnist_mlops.platform.processes import start_group, stop_group, wait_http

from helpers import BIN, free_port

pytestmark = pytest.mark.slow

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "dvc-remote"


@dataclass
class Moto:
    endpoint: str
    log: Path  # moto's request log: one `"GET /bucket/key HTTP/1.1" 200 -` line per request

    def requests_since(self, offset: int) -> str:
        return self.log.read_bytes()[offset:].decode(errors="replace")


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[Moto]:
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
        yield Moto(endpoint, log)
    finally:
        stop_group(proc)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cached_objects(root: Path) -> set[str]:
    """The objects in a checkout's DVC cache, as `files/md5/xx/yyyy` keys."""
    cache = root / ".dvc" / "cache"
    return {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


def object_key(md5: str) -> str:
    return f"files/md5/{md5[:2]}/{md5[2:]}"


@pytest.mark.timeout(300)
def test_push_then_pull_into_a_fresh_clone(project, s3: Moto, tmp_path, monkeypatch):
    project.env.update(CREDENTIALS)
    project.run("dvc", "remote", "add", "-d", "storage", f"s3://{BUCKET}/mnist")
    project.run("dvc", "remote", "modify", "storage", "endpointurl", s3.endpoint)
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
    # what the clone needs: the .dir manifest and one object per file (DVC 3: plain md5 of the bytes)
    needed = {object_key(result.md5)} | {object_key(hashlib.md5(p.read_bytes()).hexdigest())
                                         for p in (project.root / "data").iterdir()}
    assert len(needed) == 3

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project.root), str(clone)], check=True, timeout=120)
    assert not (clone / "data").exists()
    assert cached_objects(clone) == set()  # the clone starts with nothing: no data, no DVC cache
    env = {**project.env, "MNIST_MLOPS_ROOT": str(clone), "MNIST_MLOPS_CACHE": str(clone / ".cache")}
    offset = s3.log.stat().st_size
    pulled = subprocess.run(["dvc", "pull", "data.dvc"], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=240)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert digests(clone / "data") == digests(project.root / "data")
    assert len(digests(clone / "data")) == 2

    # the bytes came from the remote: every object was read from the bucket during the pull
    # and only then landed in the clone's own cache
    served = set(re.findall(rf'"GET /{BUCKET}/mnist/(files/md5/[0-9a-f]{{2}}/[0-9a-f.dir]+)[ ?][^"]*" 20[06] ',
                            s3.requests_since(offset)))
    assert needed <= served, (sorted(needed), sorted(served), s3.requests_since(offset)[-3000:])
    assert needed <= cached_objects(clone)
    status = subprocess.run(["dvc", "status"], cwd=clone, env=env, capture_output=True, text=True, timeout=120)
    assert "data.dvc" not in status.stdout, status.stdout
