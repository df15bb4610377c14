"""The Open Inference Protocol and the binary bodies: parsing in-process, then the session's
served champion over real HTTP, with a real OIP client (`tritonclient.http`) beside /predict."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from mnist_mlops.serving import oip
from mnist_mlops.serving.inputs import binary_images, decode_tensor, encode_tensor, parse_images

from helpers import Server, prepared_digits


def infer_body(images: np.ndarray, datatype: str = "UINT8", binary: bool = True, **header) -> tuple[bytes, dict]:
    """An infer request as the binary tensor data extension writes it (JSON header, then bytes)."""
    tensor = {"name": "images", "datatype": datatype, "shape": list(images.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": images.nbytes}
    else:
        tensor["data"] = images.ravel().tolist()
    head = json.dumps({"inputs": [tensor], **header}).encode()
    if not binary:
        return head, {}
    return head + images.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


# --------------------------------------------------------------------------- in-process

def test_the_tensor_form_round_trips_and_says_what_is_wrong() -> None:
    digits = np.arange(2 * 784, dtype=np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(decode_tensor(encode_tensor(digits)), digits)
    x = parse_images(encode_tensor(digits.astype(np.float32) / 255))
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float32
    bad = encode_tensor(digits) | {"base64": encode_tensor(digits[:1])["base64"]}
    with pytest.raises(ValueError, match="needs 1568 bytes, got 784"):
        decode_tensor(bad)
    with pytest.raises(ValueError, match="dtype must be uint8 or float32"):
        decode_tensor(encode_tensor(digits) | {"dtype": "int64"})
    with pytest.raises(ValueError, match="28×28"):
        parse_images(encode_tensor(np.zeros((2, 28, 27), np.uint8)))
    # The contract tester's find: a dtype that is no string was a TypeError (a 500), not a 400.
    with pytest.raises(ValueError, match="dtype must be uint8 or float32"):
        decode_tensor({"base64": "", "dtype": {}, "shape": []})


def test_binary_bodies_become_digits_or_one_line() -> None:
    digits = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(binary_images(digits.tobytes(), "application/octet-stream"), digits)
    npy = io.BytesIO()
    np.save(npy, digits.astype(np.int64))
    np.testing.assert_array_equal(binary_images(npy.getvalue(), "application/x-npy"), digits)
    for body, kind, why in ((digits.tobytes()[:-1], "application/octet-stream", "multiple of 784 bytes"),
                            (b"not numpy", "application/x-npy", "not a .npy array"),
                            (b"", "application/octet-stream", "got 0 bytes")):
        with pytest.raises(ValueError, match=why) as exc:
            binary_images(body, kind)
        assert "\n" not in str(exc.value)


def test_an_infer_request_is_read_as_the_protocol_says() -> None:
    digits = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    body, headers = infer_body(digits, outputs=[{"name": "digit", "parameters": {"binary_data": True}}], id="r1")
    req = oip.parse_infer(body, headers["Inference-Header-Content-Length"].encode())
    np.testing.assert_array_equal(req.images, digits)
    assert req.outputs == {"digit": True} and req.id == "r1"
    body, _ = infer_body(digits[:, :, :, None].astype(np.float32) / 255, "FP32", binary=False)
    req = oip.parse_infer(body, None)
    assert req.images.shape == (4, 28, 28, 1) and req.outputs == {"probabilities": False, "digit": False}


@pytest.mark.parametrize("mangle, why", [
    (lambda d: infer_body(d.reshape(1, 28, 56)), "must have shape"),
    (lambda d: infer_body(d.astype(np.int32), "INT32"), "must be UINT8 or FP32"),
    (lambda d: (infer_body(d)[0][:-10], infer_body(d)[1]), "(truncated)"),
    (lambda d: infer_body(d, binary=False, inputs=[]), "list of one tensor"),
    (lambda d: (infer_body(d, binary=False)[0].replace(b'"images"', b'"pixels"'), {}), "unknown input"),
    (lambda d: infer_body(d, binary=False, outputs=[{"name": "logits"}]), "unknown output"),
    (lambda d: (b"{not json", {}), "not JSON"),
    (lambda d: infer_body(d, binary=False, outputs=[{"name": ["digit"]}]), "unknown output"),
    (lambda d: (infer_body(d, binary=False)[0].replace(b'"UINT8"', b'["UINT8"]'), {}), "must be UINT8 or FP32"),
    (lambda d: infer_body(d, binary=False, parameters=[1]), "'parameters' must be an object"),
    (lambda d: (infer_body(d)[0], {"Inference-Header-Content-Length": "99999999"}), "does not fit"),
])
def test_a_bad_infer_request_gets_one_line(mangle, why: str) -> None:
    body, headers = mangle(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(oip.BadInference, match=why) as exc:
        length = headers.get("Inference-Header-Content-Length")
        oip.parse_infer(body, length.encode() if length else None)
    assert exc.value.status == 400 and "\n" not in str(exc.value)


def test_only_this_model_and_the_version_answering_are_found() -> None:
    oip.check_target("mnist-convnet", None, "3")
    oip.check_target("mnist-convnet", "3", "3")
    for model, version in (("resnet", None), ("mnist-convnet", "2")):
        with pytest.raises(oip.BadInference) as exc:
            oip.check_target(model, version, "3")
        assert exc.value.status == 404


# --------------------------------------------------------------------------- the served champion

@pytest.fixture(scope="module")
def digits(trained_project) -> np.ndarray:
    x, _ = prepared_digits(trained_project, "test")
    return x[np.random.default_rng(2).choice(len(x), 32, replace=False)]


def reference(served: Server, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    resp = served.predict(digits.tolist())
    assert resp.status_code == 200, resp.text
    answers = resp.json()
    return np.array([a["digit"] for a in answers]), np.array([a["probabilities"] for a in answers])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tritonclient_reads_the_same_digits_as_predict(served: Server, digits: np.ndarray) -> None:
    import tritonclient.http as triton

    expected_digits, expected_probs = reference(served, digits)
    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist-convnet")
    version = served.client.get("/model").json()["model_version"]
    meta = client.get_model_metadata("mnist-convnet")
    assert meta["versions"] == [version] and [t["name"] for t in meta["outputs"]] == ["probabilities", "digit"]
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    forms = [(digits, "UINT8"), ((digits / 255).astype(np.float32), "FP32"),
             ((digits / 255).astype(np.float32)[..., None], "FP32")]
    for binary in (True, False):
        for arr, datatype in forms:
            tensor = triton.InferInput("images", list(arr.shape), datatype)
            tensor.set_data_from_numpy(arr, binary_data=binary)
            result = client.infer("mnist-convnet", [tensor], model_version=version, outputs=[
                triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "digit")])
            np.testing.assert_array_equal(result.as_numpy("digit"), expected_digits)
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected_probs, atol=1e-6)
            response = result.get_response()
            assert response["model_version"] == version
            ids = response["parameters"]["prediction_ids"].split(",")
            assert len(set(ids)) == len(digits)
    # Each answer is logged under its id: a label for it is taken like any other.
    stored = served.client.post("/feedback", json={"prediction_id": ids[0], "label": int(expected_digits[0])})
    assert stored.status_code == 200 and stored.json()["stored"] == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bad_tensors_get_400_with_the_protocols_error(served: Server, digits: np.ndarray) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    for arr, datatype in ((digits[:, :, :14], "UINT8"), (digits.astype(np.int32), "INT32"),
                          (digits.astype(np.float32), "FP32")):  # FP32 0–255: out of [0, 1]
        tensor = triton.InferInput("images", list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr)
        with pytest.raises(InferenceServerException) as exc:
            client.infer("mnist-convnet", [tensor])
        assert exc.value.status() == "400", exc.value
    url = "/v2/models/mnist-convnet/infer"
    body, headers = infer_body(digits)
    for content, hdrs, status in ((body[:-100], headers, 400),  # truncated binary data
                                  (infer_body(digits, binary=False)[0][:-40], {}, 400),  # cut JSON
                                  (infer_body(digits[:1].repeat(2, 0), binary=False)[0]
                                   .replace(b'"shape": [2,', b'"shape": [3,'), {}, 400)):  # size
        resp = served.client.post(url, content=content, headers=hdrs)
        assert resp.status_code == status and set(resp.json()) == {"error"}, resp.text
    assert served.client.post("/v2/models/lenet/infer", content=body, headers=headers).status_code == 404
    assert served.client.post("/v2/models/mnist-convnet/versions/999/infer", content=body,
                              headers=headers).status_code == 404
    assert served.client.get("/v2/models/lenet").status_code == 404


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_takes_raw_pixels_and_npy(served: Server, digits: np.ndarray) -> None:
    expected_digits, expected_probs = reference(served, digits)
    npy = io.BytesIO()
    np.save(npy, (digits / 255).astype(np.float32))
    for content, kind in ((digits.tobytes(), "application/octet-stream"), (npy.getvalue(), "application/x-npy")):
        resp = served.client.post("/predict", content=content, headers={"Content-Type": kind})
        assert resp.status_code == 200, resp.text
        np.testing.assert_array_equal([a["digit"] for a in resp.json()], expected_digits)
        np.testing.assert_allclose([a["probabilities"] for a in resp.json()], expected_probs, atol=1e-6)
    one = served.client.post("/predict", content=digits[0].tobytes(),
                             headers={"Content-Type": "application/octet-stream"})
    assert one.headers["X-Prediction-Id"] == one.json()[0]["prediction_id"]
    bad = served.client.post("/predict", content=digits.tobytes()[:-1],
                             headers={"Content-Type": "application/octet-stream"})
    assert bad.status_code == 400 and "multiple of 784 bytes" in bad.json()["error"]
    too_many = served.client.post("/predict", content=np.zeros((600, 28, 28), np.uint8).tobytes(),
                                  headers={"Content-Type": "application/octet-stream"})
    assert too_many.status_code == 400 and "too many images" in too_many.text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_predict_command_sends_arrays_as_they_are(served: Server, digits: np.ndarray, tmp_path) -> None:
    import subprocess

    from helpers import BIN

    expected_digits, _ = reference(served, digits[:5])
    np.save(tmp_path / "five.npy", digits[:5])
    proc = subprocess.run([str(BIN / "mnist-mlops"), "predict", "five.npy", "--url", served.url], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": str(BIN)})
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("│") for line in proc.stdout.splitlines() if "five.npy[" in line]
    assert [int(r[2]) for r in rows] == expected_digits.tolist(), proc.stdout
    np.save(tmp_path / "bad.npy", np.zeros((2, 28, 27), np.uint8))
    bad = subprocess.run([str(BIN / "mnist-mlops"), "predict", "bad.npy", "--url", served.url], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": str(BIN)})
    assert bad.returncode == 1 and "400" in bad.stdout and "28×28" in bad.stdout, bad.stdout


def test_health_is_open_and_infer_is_keyed_like_predict(monkeypatch) -> None:
    """The real guard in front of a stand-in /predict: health open, metadata keyed, infer keyed
    unless predictions are opened (`serve --open-predict`)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from mnist_mlops.serving.http import Guard
    from mnist_mlops.serving.settings import API_KEY_ENV, OPEN_PREDICT_ENV

    answer = [{"prediction_id": "a" * 28, "digit": 3, "probabilities": [0.1] * 10, "model_version": "1"}]
    app = Starlette(routes=[Route("/predict", lambda _r: JSONResponse(answer), methods=["POST"]), *oip.routes()])
    monkeypatch.setenv(API_KEY_ENV, "k" * 32)
    body, headers = infer_body(np.zeros((1, 28, 28), np.uint8))
    for open_predict in (False, True):
        monkeypatch.setenv(OPEN_PREDICT_ENV, "1" if open_predict else "0")
        client = TestClient(Guard(app))
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/mnist-convnet").status_code == 401
        assert client.get("/v2/models/mnist-convnet", headers={"X-API-Key": "k" * 32}).status_code == 200
        infer = client.post("/v2/models/mnist-convnet/infer", content=body, headers=headers)
        assert infer.status_code == (200 if open_predict else 401), infer.text
        keyed = client.post("/v2/models/mnist-convnet/infer", content=body, headers={**headers, "X-API-Key": "k" * 32})
        assert keyed.status_code == 200 and keyed.json()["outputs"][1]["data"] == [3]
        assert keyed.json()["parameters"]["prediction_ids"] == "a" * 28
