"""The served champion over real HTTP: one `mnist-mlops serve` (→ `bentoml serve`) per module.

The session's trained project already holds a Bento (the flow's package step built it).
Every endpoint and every kind of bad input is exercised against that real server; the
API-key middleware is tested in-process (it needs a different environment).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import BIN, REPO, Project, Server, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def server(trained_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A fresh `mnist-mlops serve` for this module (127.0.0.1, its default host, a free port)."""
    with serving(trained_project, tmp_path_factory.mktemp("service")) as srv:
        yield srv


@pytest.fixture(scope="module")
def test_split(trained_project: Project) -> tuple[np.ndarray, np.ndarray]:
    prepared = trained_project.root / "artifacts" / "prepared"
    return np.load(prepared / "test_x.npy"), np.load(prepared / "test_y.npy")


@pytest.fixture(scope="module")
def champion(trained_project: Project):
    """The MLflow champion as MLflow itself loads it, and its registry entry."""
    import mlflow

    client = trained_project.mlflow_client()
    version = client.get_model_version_by_alias("mnist-convnet", "champion")
    mlflow.set_tracking_uri(trained_project.env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(trained_project.env["MLFLOW_TRACKING_URI"])
    model = mlflow.keras.load_model("models:/mnist-convnet@champion")
    return version, model


def digit_png(value: np.ndarray, size: int = 280, fmt: str = "PNG") -> bytes:
    """A 28×28 MNIST digit as a big dark-on-light picture, as a phone photo would give."""
    img = Image.fromarray(255 - value.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def error_message(resp: httpx.Response) -> str:
    body = resp.json()
    assert "error" in body, body
    detail = body.get("detail") or []
    return " ".join([str(body["error"]), *(f"{d.get('loc')} {d.get('msg')}" for d in detail if isinstance(d, dict))])


# --------------------------------------------------------------------------- endpoints

def test_health_endpoints(server: Server) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        assert server.client.get(path).status_code == 200, path


def test_the_serve_command_only_supervises(server: Server) -> None:
    """`mnist-mlops serve` waits for its server for as long as it runs: it finds the champion's
    Bento in the sqlite store or a short-lived child, so it never loads MLflow (protobuf's native code), BentoML's
    stack or TensorFlow. On a CPU host no process of the tree loads TensorFlow: the worker
    answers with LiteRT (mnist_mlops.litert)."""
    import psutil

    leader = psutil.Process(server.proc.pid)
    tree = [leader, *leader.children(recursive=True)]
    cli = [p for p in tree if p.cmdline()[1:3] and p.cmdline()[1].endswith("mnist-mlops") and p.cmdline()[2] == "serve"]
    assert len(cli) == 1, [p.cmdline() for p in tree]

    def native(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    assert "google/_upb" not in native(cli[0].pid) and "tensorflow" not in native(cli[0].pid)
    assert not [p.cmdline() for p in tree if "site-packages/tensorflow/" in native(p.pid)]
    workers = [p for p in tree if "site-packages/ai_edge_litert/" in native(p.pid)]
    assert len(workers) == 1, "the worker runs LiteRT: the checks above would see TensorFlow's files as they see its"
    assert server.client.get("/model").json()["runtime"] == "litert"


def test_serve_reads_the_champions_bento_at_once(trained_project: Project, monkeypatch, tmp_path) -> None:
    """`serve` finds the champion's Bento from the sqlite store and the Bento store's folder, with
    neither MLflow nor BentoML imported (serving.package.quick_serve_command): the very command,
    environment and tag that asking them gives. Where it cannot tell, it says None, and the
    child asks MLflow (and builds a missing Bento)."""
    from mnist_mlops.serving.package import quick_serve_command, serve_command

    trained_project.use_env(monkeypatch)
    root, champion = trained_project.root, trained_project.mlflow_client().get_model_version_by_alias(
        "mnist-convnet", "champion")
    for pin in (None, str(champion.version)):
        quick = quick_serve_command(root, "127.0.0.1", 3000, pin, tmp_path)
        asked = serve_command(root, "127.0.0.1", 3000, pin, tmp_path)
        assert quick is not None and (quick[0], quick[2]) == (asked[0], asked[2]), pin
        assert {k: v for k, v in quick[1].items() if asked[1].get(k) != v} == {}, pin
        assert set(asked[1]) == set(quick[1]), set(asked[1]) ^ set(quick[1])
    assert quick_serve_command(root, "127.0.0.1", 3000, "999", tmp_path) is None  # the child's one line
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "no-bentos"))
    assert quick_serve_command(root, "127.0.0.1", 3000, None, tmp_path) is None  # the child builds it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert quick_serve_command(root, "127.0.0.1", 3000, None, tmp_path) is None  # not a sqlite store


def test_openapi_page_and_spec(server: Server) -> None:
    page = server.client.get("/")
    assert page.status_code == 200 and "html" in page.headers["content-type"]
    spec = server.client.get("/docs.json").json()
    assert {"/predict", "/predict_image"} <= set(spec["paths"])


def test_model_endpoint_names_the_champion(server: Server, champion) -> None:
    version, _ = champion
    info = server.client.get("/model").json()
    assert info["model_version"] == str(version.version)
    assert info["run_id"] == version.run_id
    assert info["data_md5"] == version.tags["data.md5"]
    assert info["test_accuracy"] == pytest.approx(float(version.tags["test_accuracy"]))
    assert info["device"] == "cpu"


def test_predictions_agree_with_the_mlflow_champion(server: Server, champion, test_split) -> None:
    """No train/serve skew: all 1,000 test digits, served vs MLflow's own model, agree 100%."""
    version, model = champion
    x, _ = test_split
    expected = np.concatenate([np.asarray(model(x[i : i + 500], training=False)) for i in range(0, len(x), 500)])
    served = []
    for i in range(0, len(x), 250):
        resp = server.predict(x[i : i + 250].tolist())
        assert resp.status_code == 200, resp.text
        served += resp.json()
    assert len(served) == len(x) == 1000
    digits = np.array([p["digit"] for p in served])
    assert (digits == expected.argmax(axis=1)).mean() == 1.0
    np.testing.assert_allclose(np.array([p["probabilities"] for p in served]), expected, atol=1e-5)
    first = served[0]
    assert set(first) == {"prediction_id", "digit", "confidence", "probabilities", "model_version", "blank"}
    assert not any(p["blank"] for p in served)  # every real digit has ink
    assert len({p["prediction_id"] for p in served}) == len(served), "every prediction has its own id"
    assert first["model_version"] == str(version.version)
    assert first["confidence"] == pytest.approx(max(first["probabilities"]))
    assert len(first["probabilities"]) == 10 and sum(first["probabilities"]) == pytest.approx(1, abs=1e-4)


def test_every_input_layout_gives_the_same_answer(server: Server, test_split) -> None:
    x, _ = test_split
    ints = np.rint(x[:3, ..., 0] * 255).astype(int)  # what the raw data holds
    floats = ints / 255.0
    layouts = {
        "one 28×28 ints": [ints[0].tolist()],
        "one 28×28×1 floats": [floats[0][..., None].tolist()],
        "N×28×28 ints": ints.tolist(),
        "N×28×28×1 floats": floats[..., None].tolist(),
    }
    answers = {}
    for name, images in layouts.items():
        payload = images[0] if name.startswith("one") else images
        resp = server.predict(payload)
        assert resp.status_code == 200, (name, resp.text)
        answers[name] = [p["probabilities"] for p in resp.json()]
    ref = np.array(answers["N×28×28 ints"])
    for name, probs in answers.items():
        np.testing.assert_allclose(np.array(probs), ref[: len(probs)], atol=1e-6, err_msg=name)


def test_predict_image_uses_the_mnist_conversion(server: Server, test_split) -> None:
    """An uploaded picture is classified exactly as its imaging.to_mnist conversion sent as pixels."""
    from mnist_mlops import imaging

    x, y = test_split
    for i, fmt in ((0, "PNG"), (1, "JPEG"), (2, "PNG")):
        data = digit_png(np.rint(x[i, ..., 0] * 255), size=140 + 100 * i, fmt=fmt)
        resp = server.predict_image(data, f"digit.{fmt.lower()}")
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert set(got) == {"prediction_id", "digit", "confidence", "probabilities", "model_version", "blank"}
        assert resp.headers["x-prediction-id"] == got["prediction_id"]
        pixels = imaging.to_mnist(imaging.decode(data))
        direct = server.predict(pixels.tolist()).json()[0]
        assert got["digit"] == direct["digit"]
        np.testing.assert_allclose(got["probabilities"], direct["probabilities"], atol=1e-6)


def test_blank_inputs_are_answered_as_blank(server: Server, test_split) -> None:
    """A model reads anything, the all-zero digit as a confident "1": an input with no ink says
    so (`blank`), as JSON digits, in a batch beside real ones, and as an empty uploaded page."""
    x, _ = test_split
    empty = np.zeros((28, 28), int)
    batch = server.predict([empty.tolist(), np.rint(x[0, ..., 0] * 255).astype(int).tolist()])
    assert batch.status_code == 200, batch.text
    assert [p["blank"] for p in batch.json()] == [True, False]
    page = io.BytesIO()
    Image.new("L", (200, 200), 255).save(page, "PNG")
    assert server.predict_image(page.getvalue()).json()["blank"] is True
    assert server.predict_image(digit_png(np.rint(x[1, ..., 0] * 255))).json()["blank"] is False
    schema = server.client.get("/docs.json").json()["components"]["schemas"]
    assert "blank" in json.dumps(schema), "the OpenAPI document describes the field"


def test_ui_is_served(server: Server) -> None:
    resp = server.client.get("/ui/")
    assert resp.status_code == 200 and "html" in resp.headers["content-type"]


def test_concurrent_requests_are_batched_without_errors(server: Server, test_split) -> None:
    """32 clients at once, bad requests among them: every good one answers 200, never 5xx."""
    x, _ = test_split
    good = [x[i : i + 1].tolist() for i in range(96)]
    bad = [[[0.5] * 27] * 28] * 8

    def send(images):
        return server.client.post("/predict", json={"images": images}).status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(send, good + bad + good))
    assert codes[:96] == [200] * 96 and codes[104:] == [200] * 96
    assert codes[96:104] == [400] * 8


def test_metrics_count_requests(server: Server) -> None:
    pattern = re.compile(r'^bentoml_service_request_total\{([^}]*)\}\s+([0-9.e+]+)$', re.M)

    def count() -> float:
        text = server.client.get("/metrics").text
        return sum(float(v) for labels, v in pattern.findall(text)
                   if 'endpoint="/predict"' in labels and 'http_response_code="200"' in labels)

    before = count()
    for _ in range(3):
        assert server.predict([[0] * 28] * 28).status_code == 200
    assert count() >= before + 3


def test_cli_predict_prints_a_table(server: Server, trained_project: Project, test_split, tmp_path) -> None:
    x, _ = test_split
    files = []
    for i in range(2):
        path = tmp_path / f"digit{i}.png"
        path.write_bytes(digit_png(np.rint(x[i, ..., 0] * 255)))
        files.append(str(path))
    proc = trained_project.cli("predict", *files, "--url", server.url)
    assert "digit0.png" in proc.stdout and "digit1.png" in proc.stdout and "model version" in proc.stdout
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    proc = trained_project.cli("predict", str(bad), "--url", server.url, check=False)
    assert proc.returncode == 1 and "not a PNG or JPEG" in proc.stdout


# --------------------------------------------------------------------------- bad input

Z = [[0] * 28] * 28


@pytest.mark.parametrize("name, body, status, message", [
    ("wrong shape", {"images": [[0] * 28] * 27}, 400, "28×28"),
    ("wrong shape 3 channels", {"images": [[[0, 0, 0]] * 28] * 28}, 400, "28×28"),
    ("ragged", {"images": [[0] * 28] * 27 + [[0] * 5]}, 400, "ragged"),
    ("strings", {"images": [["a"] * 28] * 28}, 400, "numbers"),
    ("booleans", {"images": [[True] * 28] * 28}, 400, "numbers"),
    ("objects", {"images": [{"a": 1}]}, 400, "images"),
    ("not a list", {"images": "digit"}, 400, "list"),
    ("float out of range", {"images": [[1.5] * 28] * 28}, 400, "[0, 1]"),
    ("negative float", {"images": [[-0.1] * 28] * 28}, 400, "[0, 1]"),
    ("int out of range", {"images": [[256] * 28] * 28}, 400, "0–255"),
    ("negative int", {"images": [[-1] * 28] * 28}, 400, "0–255"),
    ("empty list", {"images": []}, 400, "empty"),
    ("too many images", {"images": [Z] * 513}, 400, "too many images: 513"),
    ("missing field", {"pictures": [Z]}, 400, "images"),
    ("null", {"images": None}, 400, "list"),
])
def test_bad_json_input(server: Server, name, body, status, message) -> None:
    resp = server.client.post("/predict", json=body)
    assert resp.status_code == status, (name, resp.text)
    assert message in error_message(resp), (name, resp.text)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_inf(server: Server, token: str) -> None:
    row = "[" + ",".join([token] + ["0.0"] * 27) + "]"
    body = '{"images": [' + ",".join([row] * 28) + "]}"
    resp = server.client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert "NaN or infinite" in error_message(resp)


def test_file_upload_to_predict(server: Server) -> None:
    resp = server.client.post("/predict", files={"images": ("x.png", digit_png(np.eye(28) * 255))})
    assert resp.status_code == 400 and "takes JSON" in error_message(resp)


def test_not_json(server: Server) -> None:
    resp = server.client.post("/predict", content=b"\x89PNG garbage", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "json" in error_message(resp).lower()


def test_bad_image_input(server: Server) -> None:
    png = digit_png(np.eye(28) * 255)
    huge = io.BytesIO()
    Image.new("1", (6000, 5000), 1).save(huge, format="PNG")  # 30 MP in a few KB
    cases = [
        ("non-image bytes", {"files": {"image": ("x.png", b"hello, I am text")}}, 400, "not a PNG or JPEG"),
        ("truncated PNG", {"files": {"image": ("x.png", png[: len(png) // 2])}}, 400, "truncated"),
        ("empty file", {"files": {"image": ("x.png", b"")}}, 400, "empty"),
        ("enormous image", {"files": {"image": ("x.png", huge.getvalue())}}, 413, "6000×5000"),
        ("file in the wrong field", {"files": {"picture": ("x.png", png)}}, 400, "image"),
        ("missing field", {"data": {"picture": "x"}}, 400, "image"),
        ("JSON instead of a file", {"json": {"image": "/etc/passwd"}}, 400, "image"),
    ]
    for name, kwargs, status, message in cases:
        resp = server.client.post("/predict_image", **kwargs)
        assert resp.status_code == status, (name, resp.text)
        assert message in error_message(resp), (name, resp.text)


def test_oversized_bodies_get_413(server: Server) -> None:
    big = b"[" + b"0," * (9 * 1024 * 1024) + b"0]"  # 18 MiB > serve.max_body_bytes
    resp = server.client.post("/predict", content=b'{"images": ' + big + b"}",
                              headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and "request body over" in error_message(resp)

    def chunks():  # no Content-Length: counted while read
        yield b'{"images": '
        for _ in range(18):
            yield b"0," * (512 * 1024)
        yield b"0}"

    resp = server.client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413


def test_still_healthy_after_bad_input(server: Server) -> None:
    assert server.client.get("/readyz").status_code == 200
    assert server.predict(Z).status_code == 200
    statuses = re.findall(r"\(status=(\d+),", server.log.read_text())  # BentoML's access log
    assert statuses and not [s for s in statuses if s.startswith("5")], statuses


# --------------------------------------------------------------------------- API key (in-process)

def test_api_key_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from mnist_mlops.serving.http import Guard

    app = Starlette(routes=[Route(p, lambda _r: PlainTextResponse("ok"), methods=["GET", "POST"])
                            for p in ("/predict", "/readyz", "/healthz", "/metrics")])
    open_client = TestClient(Guard(app))
    monkeypatch.delenv("MNIST_MLOPS_API_KEY", raising=False)
    assert open_client.post("/predict").status_code == 200
    monkeypatch.setenv("MNIST_MLOPS_API_KEY", "s3cret")
    client = TestClient(Guard(app))
    assert client.post("/predict").status_code == 401
    assert "API key" in client.post("/predict").json()["error"]
    assert client.post("/predict", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/predict", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/predict", headers={"X-API-Key": "s3cret"}).status_code == 200
    for path in ("/readyz", "/healthz", "/metrics"):
        assert client.get(path).status_code == 200
    monkeypatch.delenv("MNIST_MLOPS_API_KEY")
    small = TestClient(Guard(app, max_body_bytes=1024))
    assert small.post("/predict", content=b"x" * 2000).status_code == 413
    assert small.post("/predict", content=b"x" * 10).status_code == 200


# ----------------------------------------------------------------------------- README examples


def _readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def test_readme_curl_examples_work_when_copied(server: Server, tmp_path: Path) -> None:
    """Every curl line of the README's 'Send predictions' section, run as written."""
    host = server.url.removeprefix("http://")
    commands = [line.split("  #")[0].strip() for block in _blocks(_readme_section("Send predictions"), "bash")
                for line in block.splitlines() if line.startswith(("curl ", "python3 -c", "mnist-mlops predict"))]
    assert sum(c.startswith("curl") for c in commands) >= 5 and "mnist-mlops predict digit.png" in commands
    outputs = {}
    for cmd in commands:
        cmd = f"{cmd} --url {server.url}" if cmd.startswith("mnist-mlops predict") else cmd
        proc = subprocess.run(["bash", "-c", cmd.replace("127.0.0.1:3000", host)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr}"
        outputs[cmd] = proc.stdout
    by_endpoint = {re.search(r"127\.0\.0\.1:3000/([\w/]+)", c).group(1): out
                   for c, out in outputs.items() if c.startswith("curl")}
    assert json.loads(by_endpoint["predict"])[0]["digit"] in range(10)
    assert json.loads(by_endpoint["predict"])[0]["blank"] is False  # the README's digit.json is a drawn 1
    assert json.loads(by_endpoint["feedback"])["stored"] == 1
    assert by_endpoint["feedback/queue"].startswith("margin"), by_endpoint["feedback/queue"]  # the criterion line
    assert json.loads(by_endpoint["predict_image"])["digit"] == 1  # the README draws a vertical stroke
    assert json.loads(by_endpoint["model"])["model_version"] == "1"
    infer = json.loads(by_endpoint["v2/models/mnist"])  # the Open Inference Protocol reads the same digit
    assert infer["outputs"][1]["data"] == [json.loads(by_endpoint["predict"])[0]["digit"]]
    assert "bentoml_service_request_total" in by_endpoint["metrics"]
    predicted = outputs[f"mnist-mlops predict digit.png --url {server.url}"]
    assert "digit.png" in predicted and "│ 1 " in predicted, predicted  # the file the README made, read as a 1


def test_readme_python_example_works_when_copied(server: Server, tmp_path: Path) -> None:
    blocks = _blocks(_readme_section("Send predictions"), "python")
    assert len(blocks) >= 2  # httpx, and an Open Inference Protocol client
    Image.new("L", (64, 64), 255).save(tmp_path / "digit.png")
    for code in blocks:
        proc = subprocess.run([str(BIN / "python"), "-c", code.replace("http://127.0.0.1:3000", server.url)
                               .replace("127.0.0.1:3000", server.url.removeprefix("http://"))],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert re.search(r"^\d 0\.\d+ 1$", proc.stdout, flags=re.M), proc.stdout
