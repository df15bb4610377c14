"""The Open Inference Protocol (KServe V2, REST) beside our own API, on the same model path.

KServe, Triton, MLServer and their clients (`tritonclient`, the KServe SDK) speak it. Health
and metadata are plain routes (`routes()`). `infer` is an adapter in the HTTP guard: the
request's tensor (JSON `data`, or raw bytes after the JSON header with the binary tensor data
extension, `Inference-Header-Content-Length`) becomes a `/predict` body in the tensor form,
and /predict's answer is rewritten as an inference response. So an OIP request meets the same
input checks, adaptive batcher, prediction ids and prediction log as `/predict`: there is one
model path, not two. The prediction ids come back as the response parameter
`prediction_ids` (comma-separated, in order), to be POSTed to /feedback like any other.

Input: one tensor named `images`, UINT8 (0–255) or FP32 (in [0, 1]), shape [N, 28, 28] or
[N, 28, 28, 1]. Outputs: `probabilities` (FP32 [N, 10]) and `digit` (INT64 [N]), JSON or
binary (`binary_data` on an output, or `binary_data_output` for all). Errors are
`{"error": "<one line>"}`: 400 for a bad request, 404 for a model or version not served here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from mnist_mlops.config import MODEL_NAME

INPUT = "images"
INPUT_DTYPES = {"UINT8": np.uint8, "FP32": np.float32}
OUTPUTS = {"probabilities": "FP32", "digit": "INT64"}
OUTPUT_DTYPES = {"FP32": np.float32, "INT64": np.int64}
INFER = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
HEALTH = frozenset({"/v2/health/live", "/v2/health/ready"})
HEADER_LENGTH = b"inference-header-content-length"


class BadInference(ValueError):
    """A request the protocol refuses: its HTTP status and one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    """What an infer request asks: the digits, and how each output comes back."""

    images: np.ndarray
    outputs: dict[str, bool]  # name → binary
    id: str | None = None


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) when `path` is an infer URL."""
    m = INFER.fullmatch(path)
    return (m["model"], m["version"]) if m else None


def check_target(model: str, version: str | None, serving: str | None) -> None:
    """404 unless the URL names this model (and the version answering now, when it names one)."""
    if model != MODEL_NAME:
        raise BadInference(f"unknown model {model!r}: this server serves {MODEL_NAME}", 404)
    if version is not None and serving is not None and version != serving:
        raise BadInference(f"version {version} of {MODEL_NAME} is not loaded: version {serving} answers", 404)


# --------------------------------------------------------------------------- requests

def _header(body: bytes, header_length: bytes | None) -> tuple[dict, bytes]:
    """The JSON header of the body and the binary data after it."""
    if header_length is None:
        cut = len(body)
    else:
        try:
            cut = int(header_length)
        except ValueError:
            raise BadInference("Inference-Header-Content-Length must be an integer") from None
        if not 0 < cut <= len(body):
            raise BadInference(f"Inference-Header-Content-Length {cut} does not fit a body of {len(body)} bytes")
    try:
        header = json.loads(body[:cut])
    except (ValueError, RecursionError):
        raise BadInference("the inference request is not JSON") from None
    if not isinstance(header, dict):
        raise BadInference("the inference request must be a JSON object with 'inputs'")
    return header, body[cut:]


def _parameters(holder: dict, where: str) -> dict:
    params = holder.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadInference(f"{where}'s 'parameters' must be an object")
    return params


def _shape(tensor: dict) -> list[int]:
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) not in (3, 4)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or shape[0] < 1 or shape[1:3] != [28, 28] or (len(shape) == 4 and shape[3] != 1)):
        raise BadInference(f"input '{INPUT}' must have shape [N, 28, 28] or [N, 28, 28, 1] with N ≥ 1, "
                           f"got {json.dumps(shape)}")
    return shape


def _input(header: dict, binary: bytes) -> np.ndarray:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInference(f"'inputs' must be a list of one tensor, '{INPUT}'")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise BadInference(f"unknown input {json.dumps(tensor.get('name'))}: the model's input is '{INPUT}'")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in INPUT_DTYPES:
        raise BadInference(f"input '{INPUT}' must be UINT8 or FP32, got {json.dumps(datatype)}")
    shape, dtype = _shape(tensor), np.dtype(INPUT_DTYPES[datatype])
    count = int(np.prod(shape))
    size = _parameters(tensor, f"input '{INPUT}'").get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize:
            raise BadInference(f"binary_data_size {size} is not {count * dtype.itemsize} bytes "
                               f"({datatype} {shape})")
        if len(binary) != size:
            raise BadInference(f"the binary data holds {len(binary)} bytes, input '{INPUT}' declares {size}"
                               + (" (truncated)" if len(binary) < size else ""))
        return np.frombuffer(binary, dtype.newbyteorder("<")).reshape(shape)
    if binary:
        raise BadInference(f"{len(binary)} bytes after the JSON header, but no input declares binary_data_size")
    return _json_data(tensor.get("data"), shape, datatype)


def _json_data(data, shape: list[int], datatype: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise BadInference(f"input '{INPUT}' data is ragged") from None
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise BadInference(f"input '{INPUT}' needs 'data': numbers, or binary data")
    if arr.size != int(np.prod(shape)):
        raise BadInference(f"input '{INPUT}' has {arr.size} values, its shape {shape} needs {int(np.prod(shape))}")
    if datatype == "UINT8":
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.rint(arr)):
            raise BadInference(f"input '{INPUT}' is UINT8 but holds fractions")
        if arr.min() < 0 or arr.max() > 255:
            raise BadInference(f"UINT8 values must be in 0–255 (got {arr.min()}..{arr.max()})")
    return arr.astype(INPUT_DTYPES[datatype]).reshape(shape)


def _outputs(header: dict) -> dict[str, bool]:
    binary_all = _parameters(header, "the request").get("binary_data_output") is True
    asked = header.get("outputs")
    if asked is None:
        return dict.fromkeys(OUTPUTS, binary_all)
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise BadInference("'outputs' must be a list of {\"name\": ...}")
    chosen = {}
    for out in asked:
        if not isinstance(name := out.get("name"), str) or name not in OUTPUTS:
            raise BadInference(f"unknown output {json.dumps(name)}: the outputs are {', '.join(OUTPUTS)}")
        chosen[name] = _parameters(out, f"output '{name}'").get("binary_data", binary_all) is True
    return chosen


def parse_infer(body: bytes, header_length: bytes | None) -> InferRequest:
    """An infer request's body → what it asks, or BadInference with one line."""
    header, binary = _header(body, header_length)
    request_id = header.get("id")
    return InferRequest(images=_input(header, binary), outputs=_outputs(header),
                        id=request_id if isinstance(request_id, str) else None)


# --------------------------------------------------------------------------- responses

def error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _predict_error(body: bytes) -> str:
    """/predict's error body → its one line (a validation error's message, not its title)."""
    try:
        data = json.loads(body)
        detail = data.get("detail")
        if isinstance(detail, list) and detail and isinstance(detail[0], dict) and detail[0].get("msg"):
            return str(detail[0]["msg"])
        return str(data.get("error") or data)
    except (ValueError, AttributeError):
        return body.decode(errors="replace")[:200]


def infer_response(request: InferRequest, status: int, predict_body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """/predict's answer → the inference response: status, headers, body (JSON, then binary data)."""
    if status != 200:
        return status, {b"content-type": b"application/json"}, error(_predict_error(predict_body))
    answers = json.loads(predict_body)
    values = {"probabilities": np.array([a["probabilities"] for a in answers], np.float32),
              "digit": np.array([a["digit"] for a in answers], np.int64)}
    outputs, chunks = [], []
    for name, binary in request.outputs.items():
        arr = values[name]
        out = {"name": name, "datatype": OUTPUTS[name], "shape": list(arr.shape)}
        if binary:
            raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = arr.ravel().tolist()
        outputs.append(out)
    header = {"model_name": MODEL_NAME, "model_version": answers[0]["model_version"] if answers else "",
              "outputs": outputs,
              "parameters": {"prediction_ids": ",".join(a["prediction_id"] for a in answers)}}
    if request.id is not None:
        header["id"] = request.id
    head = json.dumps(header).encode()
    headers = {b"content-type": b"application/octet-stream" if chunks else b"application/json"}
    if chunks:
        headers[HEADER_LENGTH] = str(len(head)).encode()
    return 200, headers, b"".join([head, *chunks])


def rewriting(request: InferRequest):
    """What `http.buffered` makes of /predict's whole answer: the inference response."""
    def infer_answer(start: dict, predict_body: bytes) -> tuple[dict, bytes]:
        status, headers, body = infer_response(request, start["status"], predict_body)
        kept = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        return {"type": "http.response.start", "status": status,
                "headers": [*kept, *headers.items(), (b"content-length", str(len(body)).encode())]}, body

    return infer_answer


# --------------------------------------------------------------------------- health and metadata

def serving_version() -> str | None:
    """The registered version answering in this worker (None outside a running service)."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        return bentoml.get_current_service().active.version
    except (AttributeError, BentoMLException):  # no service instance in this process
        return None


def server_metadata() -> dict:
    from importlib.metadata import version

    return {"name": "mnist-mlops", "version": version("mnist-mlops"), "extensions": ["binary_tensor_data"]}


def model_metadata(version: str | None) -> dict:
    return {"name": MODEL_NAME, "versions": [version] if version else [], "platform": "tensorflow_keras",
            "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 28, 28]}],  # or UINT8, [-1, 28, 28, 1]
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                        {"name": "digit", "datatype": "INT64", "shape": [-1]}]}


def routes() -> list:
    """/v2, its health, and the model's metadata and readiness (with or without a version)."""
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def model(request):
        serving = serving_version()
        try:
            check_target(request.path_params["model"], request.path_params.get("version"), serving)
        except BadInference as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        return JSONResponse(model_metadata(serving)) if not request.url.path.endswith("/ready") else Response()

    async def live(_request):
        return Response()

    async def server(_request):
        return JSONResponse(server_metadata())

    return [Route("/v2", server, methods=["GET"]),
            Route("/v2/health/live", live, methods=["GET"]),
            Route("/v2/health/ready", live, methods=["GET"]),
            *(Route(p, model, methods=["GET"]) for p in (
                "/v2/models/{model}", "/v2/models/{model}/ready",
                "/v2/models/{model}/versions/{version}", "/v2/models/{model}/versions/{version}/ready"))]
