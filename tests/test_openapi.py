"""The OpenAPI document is true: a property-based contract tester (schemathesis, its `st run`)
generates requests from /docs.json for every operation and checks each answer against it.

Its checks: no 5xx; every status, content type, header and body as documented; schema-valid
requests get 2xx or a documented 4xx (a raw body that is not N × 784 bytes, a file that is not
a PNG: what a schema cannot say is refused with a status the operation documents); invalid
ones are refused. The service runs as users run it (`mnist-mlops serve`), with a log of its own.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from helpers import BIN, REPO, Project, Server, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def server(trained_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(trained_project, tmp_path_factory.mktemp("contract")) as srv:
        yield srv


def test_the_document_names_every_endpoint(server: Server) -> None:
    spec = server.client.get("/docs.json").json()
    paths = set(spec["paths"])
    assert {"/predict", "/predict_image", "/feedback", "/feedback/queue", "/model", "/predictions/{prediction_id}",
            "/v2", "/v2/health/ready", "/v2/models/{model}", "/v2/models/{model}/infer"} <= paths
    predict = spec["paths"]["/predict"]["post"]
    kinds = set(predict["requestBody"]["content"])
    assert {"application/json", "application/octet-stream", "application/x-npy"} <= kinds
    error = spec["components"]["schemas"]["Error"]
    assert error["properties"]["detail"]["type"] == "array"  # BentoML's own says string, and sends a list


def test_every_operation_keeps_its_documented_contract(server: Server, tmp_path) -> None:
    """Schemathesis's own runner, every phase (examples, coverage, fuzzing, stateful links), with
    the project's schemathesis.toml and a fixed seed, so a failure replays the same requests."""
    proc = subprocess.run([str(BIN / "st"), "--config-file", str(REPO / "schemathesis.toml"), "--no-color", "run",
                           f"{server.url}/docs.json", "--seed", "1", "--workers", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    summary = proc.stdout[proc.stdout.rfind("SUMMARY"):]
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Tested: 19" in summary and " passed" in summary, summary
