"""No anonymous writes beyond this machine (issue 24 point 1): a non-loopback bind needs the API key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mnist_mlops.errors import UserError
from mnist_mlops.serving.settings import API_KEY_ENV, exposure_warning

from helpers import BIN, TELEMETRY_OFF


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "digits.example.org"])
def test_serving_beyond_loopback_without_a_key_is_refused_in_one_line(host: str, tmp_path: Path) -> None:
    env = {**TELEMETRY_OFF, "PATH": str(BIN), "HOME": str(tmp_path)}  # no MNIST_MLOPS_API_KEY
    proc = subprocess.run([str(BIN / "mnist-mlops"), "serve", "--host", host, "--port", "3999"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"--host {host} serves beyond this machine" in line and API_KEY_ENV in line, line
    assert "--allow-anonymous-feedback" in line and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("bentoml*")) and proc.stdout == ""  # nothing built, nothing started


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_key(host: str) -> None:
    assert exposure_warning(host, allow_anonymous=False, environ={}) is None


def test_a_key_or_an_explicit_choice_lets_it_serve_beyond_loopback() -> None:
    assert exposure_warning("0.0.0.0", allow_anonymous=False, environ={API_KEY_ENV: "k" * 32}) is None
    warning = exposure_warning("0.0.0.0", allow_anonymous=True, environ={})
    assert warning.startswith("warning: serving on 0.0.0.0 without") and "labels" in warning
    with pytest.raises(UserError, match="set MNIST_MLOPS_API_KEY"):
        exposure_warning("0.0.0.0", allow_anonymous=False, environ={API_KEY_ENV: ""})


def guarded(monkeypatch, open_predict: bool):
    """The service's real HTTP guard in front of an app that answers 200 everywhere."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from mnist_mlops.serving.http import Guard
    from mnist_mlops.serving.settings import OPEN_PREDICT_ENV

    monkeypatch.setenv(API_KEY_ENV, "k" * 32)
    monkeypatch.setenv(OPEN_PREDICT_ENV, "1" if open_predict else "0")
    app = Starlette(routes=[Route(p, lambda _r: PlainTextResponse("ok"), methods=["GET", "POST"])
                            for p in ("/predict", "/predict_image", "/feedback", "/feedback/queue", "/model")])
    return TestClient(Guard(app))


@pytest.mark.parametrize("open_predict", [False, True])
def test_open_predict_opens_predictions_only(monkeypatch, open_predict: bool) -> None:
    client = guarded(monkeypatch, open_predict)
    for path in ("/predict", "/predict_image"):
        assert client.post(path, content=b"{}").status_code == (200 if open_predict else 401)
    for path in ("/feedback", "/feedback/queue", "/model"):  # labels, the queue and the rest need the key
        assert client.post(path, content=b"{}").status_code == 401
        assert client.post(path, content=b"{}", headers={"X-API-Key": "k" * 32}).status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_bento_bound_beyond_loopback_without_a_key_refuses_to_start(trained_project, tmp_path: Path) -> None:
    """`bentoml serve` of the built Bento binds 0.0.0.0 (as in a container): each worker checks
    the socket it was handed, and the server stops at once, in one line, before serving."""
    from mnist_mlops.platform.processes import free_port

    from helpers import processes_with

    port = free_port()
    marker = f"bento-refusal-{port}"
    env = {**{k: v for k, v in trained_project.env.items() if k != API_KEY_ENV}, "MNIST_MLOPS_TEST_MARKER": marker}
    proc = subprocess.run([str(BIN / "bentoml"), "serve", "mnist-classifier:latest", "--host", "0.0.0.0",
                           "--port", str(port)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    refusals = [line for line in out.splitlines() if "refusing to start" in line]
    assert len(refusals) == 1, out[-3000:]
    assert "bound to 0.0.0.0, serves beyond this machine" in refusals[0] and "ALLOW_ANONYMOUS_FEEDBACK=1" in refusals[0]
    assert "serving mnist-convnet" not in out and not processes_with(marker)  # the workers are gone too
