"""Fuzzing the live service with Hypothesis: no payload, on any endpoint, gets a 5xx.

The session's one `mnist-mlops serve` (conftest `served`). Every path of the service's own OpenAPI schema
is hit with random methods, bodies, content types and query strings; /predict gets
arbitrary JSON and near-valid digit arrays; /predict_image gets random files and forms.
Bounded: ~100 examples per test, no shrinking database written to disk.
"""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FUZZ = settings(max_examples=100, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(served):
    """The session's served champion (tests/conftest.py); only this module's part of its log is checked."""
    offset = served.log.stat().st_size
    with httpx.Client(base_url=served.url, timeout=60) as client:
        client.log_tail = lambda: served.log.read_bytes()[offset:].decode(errors="replace")  # type: ignore[attr-defined]
        yield client


@pytest.fixture(scope="module")
def paths(server: httpx.Client) -> list[str]:
    """Every path the service's OpenAPI schema declares (plus the extras mounted beside it)."""
    spec = server.get("/docs.json").json()
    found = sorted(spec["paths"])
    assert {"/predict", "/predict_image", "/readyz"} <= set(found), found
    return sorted({*found, "/model", "/ui/", "/metrics", "/"})


def ok(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.request.method, resp.request.url, resp.status_code, resp.text[:500])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=40,
)
pixels = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True, width=32))
shapes = st.sampled_from([(28, 28), (28, 28, 1), (1, 28, 28), (2, 28, 28, 1), (27, 28), (28, 29), (28,),
                          (3, 28, 28, 2), (1, 1, 28, 28), (0, 28, 28), (784,)])
content_types = st.sampled_from(["application/json", "text/plain", "application/octet-stream",
                                 "multipart/form-data", "multipart/form-data; boundary=xyz",
                                 "application/x-www-form-urlencoded", "image/png", "",
                                 "application/json; charset=latin-1"])


@FUZZ
@given(value=json_values, wrap=st.booleans())
def test_predict_with_arbitrary_json(server: httpx.Client, value, wrap: bool) -> None:
    body = json.dumps({"images": value} if wrap else value, allow_nan=True)
    ok(server.post("/predict", content=body, headers={"Content-Type": "application/json"}))


@FUZZ
@given(shape=shapes, data=st.data(), as_float=st.booleans())
def test_predict_with_near_valid_digits(server: httpx.Client, shape, data, as_float: bool) -> None:
    dtype = np.float32 if as_float else np.int64
    elements = (st.floats(-2, 2, width=32) | st.sampled_from([np.nan, np.inf, -np.inf]) if as_float
                else st.integers(-5, 300))
    arr = data.draw(arrays(dtype, shape, elements=elements))
    payload = json.dumps({"images": arr.tolist()}, allow_nan=True)
    resp = server.post("/predict", content=payload, headers={"Content-Type": "application/json"})
    ok(resp)
    if resp.status_code == 200:  # accepted: one prediction per digit, each a digit 0–9
        answers = resp.json()
        assert answers and all(0 <= p["digit"] <= 9 and len(p["probabilities"]) == 10 for p in answers)


@FUZZ
@given(body=st.binary(max_size=4096), ctype=content_types, path=st.sampled_from(["/predict", "/predict_image"]))
def test_raw_bodies_with_any_content_type(server: httpx.Client, body: bytes, ctype: str, path: str) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    ok(server.post(path, content=body, headers=headers))


@FUZZ
@given(value=json_values, raw=st.binary(max_size=1024), as_json=st.booleans())
def test_feedback_with_arbitrary_bodies(server: httpx.Client, value, raw: bytes, as_json: bool) -> None:
    body = json.dumps(value, allow_nan=True).encode() if as_json else raw
    resp = server.post("/feedback", content=body, headers={"Content-Type": "application/json"})
    ok(resp)
    assert resp.status_code in (400, 404), (body[:200], resp.text[:300])  # no random body is a label


@pytest.mark.parametrize("path", ["/predict", "/feedback"])
def test_json_nested_too_deep_is_a_400(server: httpx.Client, path: str) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        resp = server.post(path, content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (path, resp.status_code, resp.text[:300])


def _png_like(data: st.DataObject) -> bytes:
    from PIL import Image

    kind = data.draw(st.sampled_from(["random", "png-header", "real", "truncated"]))
    raw = data.draw(st.binary(max_size=2048))
    if kind == "random":
        return raw
    if kind == "png-header":
        return b"\x89PNG\r\n\x1a\n" + raw
    w, h = data.draw(st.integers(1, 300)), data.draw(st.integers(1, 300))
    mode = data.draw(st.sampled_from(["L", "RGB", "RGBA", "1", "P", "I;16"]))
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format=data.draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"]))
                                 if mode in ("L", "RGB") else "PNG")
    full = buf.getvalue()
    return full if kind == "real" else full[: max(1, len(full) * data.draw(st.integers(1, 9)) // 10)]


@FUZZ
@given(data=st.data(), field=st.sampled_from(["image", "image", "file", "images", ""]),
       filename=st.text(max_size=30), extra=st.booleans())
def test_predict_image_with_random_files(server: httpx.Client, data, field: str, filename: str, extra: bool) -> None:
    files = {field: (filename or "x", _png_like(data), data.draw(st.sampled_from(["image/png", "text/plain", ""])))}
    form = {"note": data.draw(st.text(max_size=20))} if extra else None
    ok(server.post("/predict_image", files=files, data=form))


@FUZZ
@given(data=st.data(), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       query=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=16), max_size=3))
def test_every_schema_path_with_any_method(server: httpx.Client, paths: list[str], data, method: str, query) -> None:
    path = data.draw(st.sampled_from(paths))
    body = data.draw(st.one_of(st.none(), st.binary(max_size=512), json_values.map(json.dumps)))
    ok(server.request(method, path, params=query, content=body))


def test_service_still_healthy_after_fuzzing(server: httpx.Client) -> None:
    assert server.get("/readyz").status_code == 200
    digit = [[0] * 28 for _ in range(28)]
    assert server.post("/predict", json={"images": digit}).status_code == 200
    log = server.log_tail()  # type: ignore[attr-defined]
    assert "status=500" not in log, log[-3000:]  # BentoML logs every request with its status
