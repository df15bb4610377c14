"""The service's OpenAPI document, made true: every endpoint, with what it really sends.

BentoML writes the document from the `@bentoml.api` methods only (see DESIGN.md): the routes
of the mounted app (/model, /feedback, /feedback/queue, /predictions/{id}, the Open Inference
Protocol under /v2) are missing, its error schemas declare `detail` a string while its own
400 bodies carry a list, and /predict's binary bodies are not there. `document` starts from
BentoML's and completes it; the HTTP guard serves it at /docs.json (and so to the OpenAPI page
at /). `tests/test_openapi.py` holds the service to it with a property-based contract tester.
"""

from __future__ import annotations

import copy

from mnist_mlops.config import MODEL_NAME
from mnist_mlops.serving import oip

REF = "#/components/schemas/{}"
ERROR = {
    "type": "object", "required": ["error"],
    "description": "Every refusal: `error` is one line; `detail` says where (`loc`) and what (`msg`).",
    "properties": {
        "error": {"type": "string"},
        "detail": {"type": "array", "items": {"type": "object", "properties": {
            "type": {"type": "string"}, "loc": {"type": "array", "items": {}}, "msg": {"type": "string"}}}},
        "status": {"type": "integer"}},
}
OIP_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
             "description": "The Open Inference Protocol's error: one line."}
WHY = {400: "Bad Request: the input is wrong (one line says how)", 401: "the API key is missing or wrong",
       404: "Not Found", 413: "the body (or image) is over the limit", 503: "the label store is unavailable",
       507: "the label store's disk is full", 500: "Internal Server Error"}
LABEL = {"type": "object", "required": ["prediction_id", "label"], "additionalProperties": False, "properties": {
    "prediction_id": {"type": "string", "minLength": 1, "description": "the id a prediction returned"},
    "label": {"type": "integer", "minimum": 0, "maximum": 9, "description": "the right digit"}}}
STORED = {"type": "object", "required": ["stored", "items"], "properties": {
    "stored": {"type": "integer"},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "prediction_id": {"type": "string"}, "label": {"type": "integer"}, "predicted": {"type": "integer"}}}}}}
QUEUE = {"type": "object", "required": ["criterion", "items"], "properties": {
    "criterion": {"type": "string", "description": "how the questions are ranked"},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "prediction_id": {"type": "string"}, "digit": {"type": "integer"}, "confidence": {"type": "number"},
        "margin": {"type": "number"}, "model_version": {"type": "string"}, "time": {"type": "string"},
        "image": {"type": "string", "description": "the 28×28 digit as a PNG data URL"}}}}}}
TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string"},
    "shape": {"type": "array", "items": {"type": "integer"}}, "parameters": {"type": "object"},
    "data": {"type": "array", "items": {}}}}
INPUT_TENSOR = {**TENSOR, "properties": {
    **TENSOR["properties"], "name": {"enum": [oip.INPUT]}, "datatype": {"enum": list(oip.INPUT_DTYPES)},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 3, "maxItems": 4,
              "description": "[N, 28, 28] or [N, 28, 28, 1]"},
    "data": {"type": "array", "items": {"type": "number", "minimum": 0},
             "description": "N × 784 values, row-major (none when `parameters.binary_data_size` is set)"}}}
INFER_REQUEST = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"}, "parameters": {"type": "object"},
    "inputs": {"type": "array", "items": INPUT_TENSOR, "minItems": 1, "maxItems": 1,
               "description": f"one tensor, '{oip.INPUT}': UINT8 (0–255) or FP32 (in [0, 1])"},
    "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
        "name": {"enum": list(oip.OUTPUTS)}, "parameters": {"type": "object"}}}}}}
INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"], "properties": {
    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
    "parameters": {"type": "object", "properties": {"prediction_ids": {
        "type": "string", "description": "the answers' prediction ids, comma-separated, in order"}}},
    "outputs": {"type": "array", "items": TENSOR}}}
METADATA_TENSOR = {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                                     "shape": {"type": "array", "items": {"type": "integer"}}}}
MODEL_METADATA = {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"], "properties": {
    "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
    "platform": {"type": "string"}, "inputs": {"type": "array", "items": METADATA_TENSOR},
    "outputs": {"type": "array", "items": METADATA_TENSOR}}}
SERVER_METADATA = {"type": "object", "required": ["name", "version", "extensions"], "properties": {
    "name": {"type": "string"}, "version": {"type": "string"},
    "extensions": {"type": "array", "items": {"type": "string"}}}}


def _example_digit() -> list[list[int]]:
    """A drawn 1: a vertical bar of 255s, four pixels wide."""
    return [[255 if 12 <= c < 16 and 4 <= r < 24 else 0 for c in range(28)] for r in range(28)]


def _json(schema: dict, example=None) -> dict:
    body = {"schema": schema}
    if example is not None:
        body["example"] = example
    return {"application/json": body}


def _responses(ok: dict | None, *errors: int, error: str = "Error", ok_description: str = "OK") -> dict:
    out = {"200": {"description": ok_description, **({"content": ok} if ok else {})}}
    for status in errors:
        out[str(status)] = {"description": WHY[status], "content": _json({"$ref": REF.format(error)})}
    return out


def _nullable(schema):
    """pydantic's `anyOf: [X, {type: null}]` in OpenAPI 3.0's words: X with `nullable: true`."""
    if isinstance(schema, list):
        return [_nullable(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _nullable(v) for k, v in schema.items()}
    options = schema.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options and len(options) == 2:
        (kept,) = [o for o in options if o != {"type": "null"}]
        schema = {**{k: v for k, v in schema.items() if k != "anyOf"}, **kept, "nullable": True}
    return schema


def _ours(model_info: dict) -> dict:
    """The paths BentoML's document leaves out."""
    pid = {"name": "prediction_id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^[0-9a-f]{28}$"}}
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}, "example": MODEL_NAME}
    version = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    labels = {"oneOf": [LABEL, {"type": "array", "items": LABEL, "minItems": 1}]}
    infer_example = {"inputs": [{"name": oip.INPUT, "datatype": "UINT8", "shape": [1, 28, 28],
                                 "data": sum(_example_digit(), [])}]}
    infer = {"post": {
        "description": "Open Inference Protocol inference: JSON tensors, or the binary tensor data extension "
                       "(the JSON header, then the bytes; `Inference-Header-Content-Length` says where it ends).",
        "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                        "schema": {"type": "integer", "minimum": 1}}],
        "requestBody": {"required": True, "content": {
            **_json(INFER_REQUEST, infer_example),
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": _responses({**_json(INFER_RESPONSE),
                                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                                400, 401, 404, 413, error="OIPError")}}
    meta = {"get": {"responses": _responses(_json(MODEL_METADATA), 401, 404, error="OIPError")}}
    ready = {"get": {"responses": _responses(None, 401, 404, error="OIPError",
                                             ok_description="the model is ready")}}
    return {
        "/model": {"get": {"description": "Which model answers, and the follower's state.",
                           "responses": _responses(_json(model_info), 401)}},
        "/feedback": {"post": {
            "description": "A person's label for an earlier prediction (or a list of them): all are stored or none.",
            "requestBody": {"required": True, "content": _json(labels, {"prediction_id": "01a2378113474b243e26884359ed",
                                                                         "label": 7})},
            "responses": _responses(_json(STORED), 400, 401, 404, 413, 503, 507)}},
        "/feedback/queue": {"get": {
            "description": "Unlabelled answers a label would teach most about, smallest top-two margin first.",
            "parameters": [{"name": "n", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}}],
            "responses": _responses(_json(QUEUE), 400, 401)}},
        "/predictions/{prediction_id}": {"get": {
            "description": "A prediction's lineage card: its answer, its label, the model, run and data behind it.",
            "parameters": [pid], "responses": _responses(_json({"type": "object"}), 400, 401, 404)}},
        "/v2": {"get": {"responses": _responses(_json(SERVER_METADATA), 401, error="OIPError")}},
        "/v2/health/live": {"get": {"responses": _responses(None, ok_description="the server is live")}},
        "/v2/health/ready": {"get": {"responses": _responses(None, ok_description="the server is ready")}},
        "/v2/models/{model}": {**meta, "parameters": [model]},
        "/v2/models/{model}/ready": {**ready, "parameters": [model]},
        "/v2/models/{model}/versions/{version}": {**meta, "parameters": [model, version]},
        "/v2/models/{model}/versions/{version}/ready": {**ready, "parameters": [model, version]},
        "/v2/models/{model}/infer": {**infer, "parameters": [model]},
        "/v2/models/{model}/versions/{version}/infer": {**infer, "parameters": [model, version]},
    }


def _mend_apis(paths: dict) -> None:
    """BentoML's own APIs: the errors they really send, /predict's binary bodies and an example."""
    for path in ("/predict", "/predict_image"):
        op = paths[path]["post"]
        op["responses"] = {"200": next(v for k, v in op["responses"].items() if str(k) == "200"),
                           **{k: v for k, v in _responses(None, 400, 401, 413).items() if k != "200"}}
    paths["/predict_image"]["post"]["requestBody"]["required"] = True
    body = paths["/predict"]["post"]["requestBody"]
    body["required"] = True
    body["content"]["application/json"]["example"] = {"images": _example_digit()}
    raw = "N×28×28 uint8 pixels, row-major (N × 784 bytes)"
    body["content"]["application/octet-stream"] = {"schema": {"type": "string", "format": "binary",
                                                              "description": raw}}
    body["content"]["application/x-npy"] = {"schema": {"type": "string", "format": "binary",
                                                       "description": "a .npy file (numpy.save) of digits"}}


def document(bentoml_spec: dict, model_info: dict) -> dict:
    """BentoML's document (`Service.openapi_spec.asdict()`), completed and corrected."""
    spec = copy.deepcopy(bentoml_spec)
    _mend_apis(spec["paths"])
    spec["paths"].update(_ours(_nullable(model_info)))
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse"):
        schemas.pop(unused, None)
    schemas.update(Error=ERROR, OIPError=OIP_ERROR)
    spec["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "$MNIST_MLOPS_API_KEY, when the server has one"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    return spec
