"""Security: loopback binding, the API key on a live server, decompression bombs, safe-mode loading.

One `mnist-mlops serve` for the module, started the way a user would with
$MNIST_MLOPS_API_KEY set. Secrets in MLflow params/tags and in the flow's log are checked
on a real training run in tests/test_faults.py (the run that follows the SIGKILL), so no
extra training is paid for here; request-body limits (413) are in tests/test_service.py.
"""

from __future__ import annotations

import ast
import io
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from mnist_mlops.platform.processes import start_group, stop_group

from helpers import BIN, LOOPBACK, REPO, Project, Server, free_port, log_keras, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OPEN = ("/healthz", "/livez", "/readyz", "/metrics", "/ui/")  # /ui/: a static page, no model access


def listening(proc: subprocess.Popen) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of the process and its descendants."""
    import psutil

    root = psutil.Process(proc.pid)
    found = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def tree_rss(proc: subprocess.Popen) -> int:
    import psutil

    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


@pytest.fixture(scope="module")
def secured(trained_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`mnist-mlops serve` with an API key, on its default host, until /readyz (an open path)."""
    key = secrets.token_urlsafe(24)
    port = free_port()
    workdir = tmp_path_factory.mktemp("secured")
    log = workdir / f"serve-{port}.log"  # never inside the shared project, nor its records
    env = dict(trained_project.env, MNIST_MLOPS_API_KEY=key, MNIST_MLOPS_PREDICTION_LOG=str(workdir / "predictions"),
               MNIST_MLOPS_FEEDBACK=str(workdir / "feedback"))
    server = start_server([str(BIN / "mnist-mlops"), "serve", "--port", str(port)], trained_project.root, env, log,
                          f"http://{LOOPBACK}:{port}/readyz", key=key)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def digit(trained_project: Project) -> list:
    x = np.load(trained_project.root / "artifacts" / "prepared" / "test_x.npy")
    return np.rint(x[0, ..., 0] * 255).astype(int).tolist()


# --------------------------------------------------------------------------- binding


def test_serve_binds_loopback_only_by_default(secured: Server) -> None:
    sockets = listening(secured.proc)
    assert ("127.0.0.1", secured.port) in sockets, sockets
    assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets  # no 0.0.0.0 / :: anywhere


def test_mlflow_ui_binds_loopback_only_by_default(project: Project, tmp_path: Path) -> None:
    """`mnist-mlops ui` starts `mlflow ui --host 127.0.0.1`; checked on the process it spawns.

    (Waiting for MLflow's four uvicorn workers to bind costs over a minute on a busy CI
    machine; the command line is what the project controls.) A fresh project: the MLflow UI
    may create its store and artifact folder, which the session's trained project must not get.
    """
    import psutil

    port = free_port()
    log = tmp_path / "ui.log"
    proc = start_group([str(BIN / "mnist-mlops"), "ui", "--port", str(port)], log, project.env, cwd=project.root)
    try:
        deadline = time.monotonic() + 120
        while True:
            children = [c.cmdline() for c in psutil.Process(proc.pid).children(recursive=True)]
            server = [c for c in children if "mlflow" in " ".join(c) and "--port" in c]
            if server or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert server, log.read_text()[-3000:]
        cmd = server[0]
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == str(port), cmd
    finally:
        stop_group(proc)


@pytest.mark.timeout(300)
def test_schedule_prefect_server_binds_loopback_only(project: Project) -> None:
    """`mnist-mlops schedule` starts `prefect server start` on 127.0.0.1 (there is no --host).

    The check is on the sockets the command's processes really listen on, once the
    server's API answers: its port on 127.0.0.1, and no socket on any other address.
    """
    port = free_port()
    env = dict(project.env)
    env.pop("PREFECT_API_URL", None)
    server = start_server([str(BIN / "mnist-mlops"), "schedule", "--interval", "3600", "--port", str(port)],
                          project.root, env, project.root / "schedule.log", f"http://127.0.0.1:{port}/api/health",
                          timeout=240)
    try:
        sockets = listening(server.proc)
        assert ("127.0.0.1", port) in sockets, (sockets, server.log_tail())
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets  # no 0.0.0.0 / :: anywhere
    finally:
        server.stop()


# --------------------------------------------------------------------------- API key


def test_requests_without_the_right_key_get_401(secured: Server, digit: list) -> None:
    body = {"images": digit}
    with httpx.Client(base_url=secured.url, timeout=60) as c:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                        {"Authorization": secured.key}, {"X-API-Key": secured.key[:-1]},
                        {"X-API-Key": secured.key + "x"}):
            resp = c.post("/predict", json=body, headers=headers)
            assert resp.status_code == 401, (headers, resp.text)
            assert "API key" in resp.json()["error"]
        for path in ("/model", "/docs.json", "/"):
            assert c.get(path).status_code == 401, path
        assert c.post("/predict_image", files={"image": ("x.png", b"\x89PNG")}).status_code == 401
        for headers in ({"X-API-Key": secured.key}, {"Authorization": f"Bearer {secured.key}"}):
            resp = c.post("/predict", json=body, headers=headers)
            assert resp.status_code == 200 and 0 <= resp.json()[0]["digit"] <= 9, resp.text
        assert c.get("/model", headers={"X-API-Key": secured.key}).status_code == 200
        # Labels are guarded like predictions: without the key nothing is stored.
        label = {"prediction_id": resp.json()[0]["prediction_id"], "label": 3}
        assert c.post("/feedback", json=label).status_code == 401
        assert c.post("/feedback", json=label, headers={"X-API-Key": "wrong"}).status_code == 401
        stored = c.post("/feedback", json=label, headers={"X-API-Key": secured.key})
        assert stored.status_code == 200 and stored.json()["stored"] == 1, stored.text
        # ... and so is a prediction's lineage card (it shows the digit and the label)
        card = f"/predictions/{label['prediction_id']}"
        assert c.get(card).status_code == 401
        shown = c.get(card, headers={"X-API-Key": secured.key})
        assert shown.status_code == 200 and shown.json()["label"]["label"] == 3, shown.text


def test_health_endpoints_stay_open(secured: Server) -> None:
    with httpx.Client(base_url=secured.url, timeout=30) as c:
        for path in OPEN:
            assert c.get(path).status_code == 200, path


def test_api_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware's check goes through hmac.compare_digest (a spy, the real function runs)."""
    import hmac

    from mnist_mlops.serving.http import Guard

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    monkeypatch.setenv("MNIST_MLOPS_API_KEY", "k3y")
    guard = Guard(lambda *a: None)
    assert guard.authorized({b"x-api-key": b"k3y"}) and not guard.authorized({b"x-api-key": b"k3z"})
    assert guard.authorized({b"authorization": b"Bearer k3y"})
    assert calls == [(b"k3y", b"k3y"), (b"k3z", b"k3y"), (b"k3y", b"k3y")]


def test_the_key_never_reaches_the_log_or_the_answers(secured: Server, digit: list) -> None:
    with httpx.Client(base_url=secured.url, timeout=60, headers={"X-API-Key": secured.key}) as c:
        c.post("/predict", json={"images": digit})
        answers = [c.get("/model").text, c.get("/metrics").text, c.get("/docs.json").text]
    for text in answers:
        assert secured.key not in text
    assert secured.key not in secured.log.read_text()


# --------------------------------------------------------------------------- image limits


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_decompression_bombs_are_refused_without_decoding(secured: Server) -> None:
    """Tiny files that would decode to ~10⁸–10⁹ pixels get 413 and cost the server no memory."""
    import struct
    import zlib

    from PIL import Image

    bomb = _png(Image.new("1", (12_000, 12_000)))  # 144 Mpx of zeros in ~20 KB
    assert len(bomb) < 100_000
    # a PNG header that claims 40000×40000 with (almost) no pixel data behind it
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    liar = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))
    before = tree_rss(secured.proc)
    with httpx.Client(base_url=secured.url, timeout=60, headers={"X-API-Key": secured.key}) as c:
        for name, data in (("bomb.png", bomb), ("liar.png", liar)):
            resp = c.post("/predict_image", files={"image": (name, data)})
            assert resp.status_code == 413, (name, resp.status_code, resp.text)
            assert "pixels" in resp.json()["error"]
        assert c.get("/readyz").status_code == 200
    assert tree_rss(secured.proc) - before < 100 * 1024 * 1024  # 144 Mpx decoded would be ≥ 144 MB


# --------------------------------------------------------------------------- safe loading


def _lambda_model():
    import keras

    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dense(10, activation="softmax")])


def test_model_files_are_loaded_in_keras_safe_mode(tmp_path: Path) -> None:
    """A .keras file carrying Python code (a Lambda layer) is refused by the project's loader."""
    from mnist_mlops.scoring import load_keras

    path = tmp_path / "evil.keras"
    _lambda_model().save(path)
    with pytest.raises(ValueError, match="safe_mode"):
        load_keras(path)


@pytest.mark.timeout(300)
def test_registry_rescoring_refuses_a_model_with_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The champion gate loads registered versions through MLflow: still safe mode."""
    import mlflow

    from mnist_mlops import registry
    from mnist_mlops.config import MODEL_NAME

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        mlflow.set_experiment("security")
        with mlflow.start_run():
            info = log_keras(_lambda_model(), registered_model_name=MODEL_NAME)
        x = np.zeros((4, 28, 28, 1), np.float32)
        with pytest.raises(Exception, match="safe_mode"):
            registry.rescore(str(info.registered_model_version), x, np.zeros(4, np.int64))
    finally:
        mlflow.set_tracking_uri(None)


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and
            (getattr(n.func, "attr", None) == name or getattr(n.func, "id", None) == name)]


def test_nothing_is_unpickled_and_every_keras_load_is_safe() -> None:
    """Source guard: no pickle-family loader anywhere in the package; every Keras load is safe_mode=True."""
    unsafe_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    paths = sorted((REPO / "src" / "mnist_mlops").rglob("*.py"))  # every subpackage too
    assert {"evaluate.py", "registry.py", "service.py"} <= {p.name for p in paths}
    for path in paths:
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & unsafe_modules, (path.name, imported & unsafe_modules)
        for call in _calls(tree, "load"):
            for kw in call.keywords:
                if kw.arg == "allow_pickle":
                    assert isinstance(kw.value, ast.Constant) and kw.value.value is False, path.name
        for call in _calls(tree, "load_model"):
            is_keras = "keras.models" in ast.unparse(call.func) or "keras.saving" in ast.unparse(call.func)
            if is_keras:
                safe = [kw for kw in call.keywords if kw.arg == "safe_mode"]
                assert safe and isinstance(safe[0].value, ast.Constant) and safe[0].value.value is True, \
                    (path.name, ast.unparse(call))

