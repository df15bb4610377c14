"""The BentoML service: the MLflow champion behind HTTP, batched, on CPU or GPU.

Endpoints
- POST /predict        JSON {"images": [...]}: one 28×28 digit or many (floats in [0, 1] or
                       integers 0–255, with or without the channel axis). Adaptive batching.
- POST /predict_image  multipart field `image`: a PNG/JPEG of any size, converted the classic
                       MNIST way (mnist_mlops.serving.imaging) and normalised like the training data.
- GET  /model          which model answers: registered version, MLflow run id, data md5, accuracy.
- GET  /ui/            the drawing page (static files from mnist_mlops/serving/ui/).
- /healthz /livez /readyz /metrics (Prometheus) and the OpenAPI page at / — BentoML's own.

Bad input never reaches the model: /predict's `images` is checked and normalised by a
pydantic validator while the request is parsed, *before* the adaptive batcher merges it
with other requests, so one bad request can only fail itself (400 with a message).
The body size limit (413) and the optional API key (401) are an ASGI middleware in front of
everything.

Inference runs through one `tf.function` traced once for any batch size, never
`model.predict` (~50 ms a call). Build arguments (`bentoml build --arg`, set by
`mnist-mlops package` from params.yaml's `serve` section) pick the model and the limits.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from mnist_mlops.config import MODEL_NAME, ServeParams
from mnist_mlops.preprocess import INPUT_SHAPE, normalize

logger = logging.getLogger("mnist_mlops.serving.service")

UI_DIR = Path(__file__).resolve().parent / "ui"
API_KEY_ENV = "MNIST_MLOPS_API_KEY"
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics", "/ui"})  # open even with an API key


def is_open(path: str) -> bool:
    """Health, metrics and the drawing page (a browser cannot send a key to open it)."""
    return path in OPEN_PATHS or path.startswith("/ui/")
FILE_FIELDS = {"/predict_image": {"image"}}  # multipart file fields each endpoint takes
# Benchmarks only: answer without running the model, to measure the HTTP stack's ceiling.
NOOP_MODEL = os.environ.get("MNIST_MLOPS_NOOP_MODEL") == "1"
KERAS_FILE = "mlflow_model/data/model.keras"  # inside the BentoML model (bentoml.mlflow.import_model)


class ServeArgs(ServeParams):
    """Build arguments: the model to serve plus params.yaml's `serve` section."""

    model: str = f"{MODEL_NAME}:latest"


ARGS = bentoml.use_arguments(ServeArgs)


def gpu_count() -> int:
    """NVIDIA GPUs visible to this machine, without importing TensorFlow (0 on failure)."""
    try:
        from bentoml._internal.resource import system_resources

        return len(system_resources().get("nvidia.com/gpu", []))
    except Exception:  # noqa: BLE001 - no NVML, no GPU
        return 0


GPUS = gpu_count()
WORKERS = ARGS.workers or max(1, GPUS)  # one worker per GPU; one on CPU (TF uses every core)


# --------------------------------------------------------------------------- input checks

def _bad(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_images", message)


def parse_images(value: Any, max_images: int = ARGS.max_images_per_request) -> np.ndarray:
    """JSON `images` → float32 N×28×28×1 in [0, 1], or a one-line reason why not.

    Accepts one digit (28×28 or 28×28×1) or many (N×28×28 or N×28×28×1); integers are
    0–255 pixels, floats are already in [0, 1]. Then `preprocess.normalize`, the function
    training used, so served inputs are exactly what the model was trained on.
    """
    if isinstance(value, np.ndarray):
        arr = value
    else:
        if not isinstance(value, list):
            raise _bad(f"'images' must be a list of 28×28 digits (nested lists of numbers), "
                       f"got {type(value).__name__}")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            raise _bad("'images' is ragged: every digit must be 28 rows of 28 numbers") from None
    if arr.size == 0:
        raise _bad("'images' is empty: send at least one 28×28 digit")
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise _bad("'images' must hold numbers only (floats in [0, 1] or integers 0–255)")
    shape = arr.shape
    if arr.ndim == 4 and shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and shape == INPUT_SHAPE:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != INPUT_SHAPE[:2]:
        raise _bad(f"each digit must be 28×28 (optionally ×1), got 'images' of shape {list(shape)}")
    if len(arr) > max_images:
        raise _bad(f"too many images: {len(arr)} in one request, at most {max_images}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise _bad("'images' contains NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise _bad(f"float pixel values must be in [0, 1] (got {arr.min():g}..{arr.max():g}); "
                       "send integers for 0–255 pixels")
    elif arr.min() < 0 or arr.max() > 255:
        raise _bad(f"integer pixel values must be in 0–255 (got {arr.min()}..{arr.max()})")
    return normalize(arr)


IMAGES_SCHEMA = {
    "description": "One 28×28 digit or a list of them (each optionally 28×28×1): floats in [0, 1] "
                   f"or integers 0–255; at most {ARGS.max_images_per_request} per request.",
    "type": "array",
    "items": {"type": "array"},
}
Images = Annotated[Any, BeforeValidator(parse_images), WithJsonSchema(IMAGES_SCHEMA)]


class Prediction(BaseModel):
    digit: int = Field(description="the predicted digit, 0–9")
    confidence: float = Field(description="the probability of that digit")
    probabilities: list[float] = Field(description="the probability of each digit 0–9")
    model_version: str = Field(description=f"the registered version of {MODEL_NAME} that answered")


class ModelInfo(BaseModel):
    model_name: str
    model_version: str
    run_id: str
    data_md5: str | None = None
    test_accuracy: float | None = None
    bentoml_model: str
    device: str


def error_body(status: int, kind: str, message: str, loc: str) -> dict:
    """The shape of every error this service returns (the same as BentoML's 400s)."""
    return {"error": message, "detail": [{"type": kind, "loc": [loc], "msg": message}], "status": status}


def error_response(status: int, kind: str, message: str, loc: str = "body"):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(status, kind, message, loc), status_code=status)


# --------------------------------------------------------------------------- middleware

class Guard:
    """ASGI middleware: the request body limit (413) and the optional API key (401).

    Content-Length over the limit is refused before reading; a chunked body is read up to
    the limit and replayed. With $MNIST_MLOPS_API_KEY set, every path but the health and
    metrics endpoints needs `Authorization: Bearer <key>` or `X-API-Key: <key>`.
    """

    def __init__(self, app, max_body_bytes: int = ARGS.max_body_bytes) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.api_key = os.environ.get(API_KEY_ENV) or None

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        key = self.api_key.encode()
        bearer = headers.get(b"authorization", b"")
        given = bearer[7:].strip() if bearer[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return hmac.compare_digest(given, key)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.api_key and not is_open(path) and not self.authorized(headers):
            resp = error_response(401, "unauthorized", f"missing or wrong API key: send 'Authorization: "
                                  f"Bearer <key>' or 'X-API-Key: <key>'", "header")
            resp.headers["WWW-Authenticate"] = "Bearer"
            return await resp(scope, receive, send)
        length = headers.get(b"content-length")
        too_big = error_response(413, "body_too_large", f"request body over {self.max_body} bytes")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await error_response(400, "bad_header", "invalid Content-Length")(scope, receive, send)
            if n > self.max_body:
                return await too_big(scope, receive, send)
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        if scope.get("method") != "POST" or (length is not None and not multipart):
            return await self.app(scope, receive, send)
        # Chunked or multipart: read the body (up to the limit) here, then replay it.
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body:
                return await too_big(scope, receive, send)
            chunks.append(body)
            more = message.get("more_body", False)
        body = b"".join(chunks)

        def replay():
            sent = False

            async def receive_again():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return receive_again

        if multipart and (problem := await self.unexpected_files(scope, replay())):
            return await error_response(400, "unexpected_file", problem)(scope, receive, send)
        return await self.app(scope, replay(), send)

    @staticmethod
    async def unexpected_files(scope, receive) -> str | None:
        """A file in a field the endpoint does not take (BentoML would answer 500), or a bad form."""
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        allowed = FILE_FIELDS.get(scope["path"].rstrip("/"), set())
        try:
            form = await Request(scope, receive).form()
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's malformed form
            return f"malformed multipart form: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile) and name not in allowed:
                    expected = f"send the file as field {', '.join(sorted(allowed))!s}" if allowed else \
                        "this endpoint takes JSON"
                    return f"unexpected file in field '{name}': {expected}"
        finally:
            await form.close()
        return None


# --------------------------------------------------------------------------- routes beside the APIs

def _extra_app():
    """GET /model and the static drawing page at /ui/."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, RedirectResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def model_info(_request):
        svc = bentoml.get_current_service()
        return JSONResponse(svc.info.model_dump())

    routes = [Route("/model", model_info, methods=["GET"]),
              Route("/ui", lambda _r: RedirectResponse("/ui/"), methods=["GET"])]
    if UI_DIR.is_dir():
        routes.append(Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui"))
    return Starlette(routes=routes)


# --------------------------------------------------------------------------- the service

SERVICE_CONFIG: dict[str, Any] = {
    "name": "mnist_classifier",
    "workers": WORKERS,
    "traffic": {"timeout": ARGS.timeout_seconds},
    "metrics": {"enabled": True, "namespace": "bentoml_service"},
    **({"resources": {"gpu": GPUS}} if GPUS else {}),
}


@bentoml.service(**SERVICE_CONFIG)
@bentoml.asgi_app(_extra_app(), path="/", name="extras")
class MnistClassifier:
    bento_model = bentoml.models.BentoModel(ARGS.model)

    def __init__(self) -> None:
        self.device = configure_tensorflow()
        import keras
        import tensorflow as tf

        meta = dict(self.bento_model.info.metadata)
        self.info = ModelInfo(
            model_name=str(meta.get("model_name", MODEL_NAME)),
            model_version=str(meta.get("model_version", "unknown")),
            run_id=str(meta.get("run_id", "unknown")),
            data_md5=meta.get("data_md5"),
            test_accuracy=meta.get("test_accuracy"),
            bentoml_model=str(self.bento_model.tag),
            device=self.device,
        )
        # Keras safe mode: loading the file can never run arbitrary code.
        self.model = keras.models.load_model(self.bento_model.path_of(KERAS_FILE), safe_mode=True,
                                             compile=False)
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.float32)],
                     reduce_retracing=True)
        def forward(x):
            return model(x, training=False)

        self.forward = forward
        self.probabilities(np.zeros((1, *INPUT_SHAPE), np.float32))  # trace once, before /readyz
        logger.info("serving %s v%s (run %s) on %s", self.info.model_name, self.info.model_version,
                    self.info.run_id, self.device)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        if NOOP_MODEL:
            return np.full((len(x), 10), 0.1, np.float32)
        return self.forward(x).numpy()

    def predictions(self, x: np.ndarray) -> list[dict]:
        probs = self.probabilities(x)
        digits = probs.argmax(axis=1)
        version = self.info.model_version
        return [{"digit": int(d), "confidence": float(p[d]), "probabilities": p.tolist(),
                 "model_version": version} for d, p in zip(digits, probs)]

    @bentoml.api(batchable=True, max_batch_size=ARGS.max_batch_size, max_latency_ms=ARGS.max_latency_ms)
    def predict(self, images: Images) -> list[Prediction]:
        """Classify 28×28 digits: one prediction per image, in order."""
        return self.predictions(images)

    @bentoml.api
    def predict_image(self, image: Path) -> Prediction:
        """Classify a PNG/JPEG digit of any size (dark ink on light paper, or light on dark)."""
        from mnist_mlops.serving.imaging import ImageError, ImageTooLarge, image_to_input

        try:
            data = image.read_bytes()
            x = image_to_input(data, ARGS.max_image_pixels, ARGS.max_image_bytes)
        except ImageTooLarge as exc:
            return error_response(413, "image_too_large", str(exc), "image")
        except ImageError as exc:
            return error_response(400, "invalid_image", str(exc), "image")
        return Prediction(**self.predictions(x)[0])


def configure_tensorflow() -> str:
    """GPU: this worker's own GPU with memory growth on. CPU: as is. Returns the device used."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    from bentoml._internal.context import server_context

    index = ((server_context.worker_index or 1) - 1) % len(gpus)
    try:
        tf.config.set_visible_devices(gpus[index], "GPU")
        tf.config.experimental.set_memory_growth(gpus[index], True)
    except RuntimeError as exc:  # already initialised (e.g. in-process tests): keep going
        logger.warning("GPU configuration skipped: %s", exc)
    return f"gpu:{index}"


MnistClassifier.add_asgi_middleware(Guard)
