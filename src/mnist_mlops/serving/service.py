"""The BentoML service: the MLflow champion behind HTTP, batched, on CPU or GPU.

Endpoints
- POST /predict        JSON {"images": [...]}: one 28×28 digit or many (floats in [0, 1] or
                       integers 0–255, with or without the channel axis). Adaptive batching.
- POST /predict_image  multipart field `image`: a PNG/JPEG of any size, converted the classic
                       MNIST way (mnist_mlops.imaging) and normalised like the training data.
- POST /feedback       JSON {"prediction_id": "...", "label": 7} or a list of them: a person's
                       label for an earlier prediction, stored in the feedback store.
- GET  /model          which model answers (registered version, MLflow run id, data md5,
                       accuracy, loaded-at), the mode (follow / pinned), the last reload error.
- GET  /ui/            the drawing page (static files from mnist_mlops/serving/ui/).
- /healthz /livez /readyz /metrics (Prometheus) and the OpenAPI page at / — BentoML's own.

Bad input never reaches the model: /predict's `images` is checked and normalised by a
pydantic validator while the request is parsed, *before* the adaptive batcher merges it
with other requests, so one bad request can only fail itself (400 with a message).
The body size limit (413) and the optional API key (401) are an ASGI middleware in front of
everything.

Every prediction carries a `prediction_id` (and, for a single one, the `X-Prediction-Id`
header) and is recorded in the prediction log (mnist_mlops.records.prediction_log), off the request
path; `serve.log_predictions: false` turns that off.

Modes: `mnist-mlops serve` *follows* the registry's champion alias by default and swaps
models without a restart (mnist_mlops.serving.follow); `--pin VERSION` serves one registered
version; a Bento served as built (`bentoml serve`, a container) serves its own model. Each
worker does this by itself. Inference runs through one `tf.function` traced once for any
batch size, never `model.predict` (~50 ms a call). Build arguments (`bentoml build --arg`, set by
`mnist-mlops package` from params.yaml's `serve` section) pick the model and the limits.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import hmac
import logging
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BaseModel, BeforeValidator, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from mnist_mlops.config import MODEL_NAME, ServeParams
from mnist_mlops.digit_features import has_ink
from mnist_mlops.platform.devices import configure_tensorflow, gpu_count
from mnist_mlops.preprocess import INPUT_SHAPE, normalize
from mnist_mlops.records import feedback, prediction_log
from mnist_mlops.scoring import load_keras
from mnist_mlops.serving.follow import (
    FOLLOW_ENV,
    FOLLOW_SECONDS_ENV,
    MIN_ACCURACY_ENV,
    PIN_ENV,
    ChampionFollower,
    LoadedModel,
    champion_version,
    compile_forward,
    load_version,
)

logger = logging.getLogger("mnist_mlops.serving.service")
logging.getLogger("mnist_mlops").setLevel(logging.INFO)  # BentoML's root level would hide model swaps

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
    prediction_id: str = Field(description="this answer's id: POST it to /feedback with the right label")
    digit: int = Field(description="the predicted digit, 0–9")
    confidence: float = Field(description="the probability of that digit")
    probabilities: list[float] = Field(description="the probability of each digit 0–9")
    model_version: str = Field(description=f"the registered version of {MODEL_NAME} that answered")
    blank: bool = Field(description="true: the input holds no digit (almost no ink), so `digit` is no reading "
                                    "of it: draw or send a digit first")


class ModelInfo(BaseModel):
    """GET /model. Every field but the last three describes the model answering now; those name
    what they are: the follower's state and the model this Bento was built with (its fallback)."""

    model_name: str
    model_version: str = Field(description="the registered version answering now")
    run_id: str = Field(description="the MLflow run that trained it")
    data_md5: str | None = Field(None, description="the data version (data.dvc md5) it was trained on")
    test_accuracy: float | None = None
    canary_accuracy: float | None = Field(None, description="its score on the canary digits when swapped in")
    source: str = Field(description="registry (loaded from MLflow) or `bento <tag>` (the Bento's own model)")
    loaded_at: str
    mode: str = Field(description="follow: swaps to each new champion; pinned: serves one version")
    champion_version: str | None = Field(None, description="the version the champion alias names (follow mode)")
    behind: bool | None = Field(None, description="true while the champion is not the version answering")
    refused_version: str | None = Field(None, description="a champion this worker cannot serve, until the alias moves")
    device: str
    last_reload_error: str | None = Field(None, description="the last version the follower refused, and why")
    registry_reachable: bool | None = None
    bento_builtin_model: str = Field(description="the BentoML model built into this Bento: it answers only "
                                                 "when `source` says bento")


def error_body(status: int, kind: str, message: str, loc: str) -> dict:
    """The shape of every error this service returns (the same as BentoML's 400s)."""
    return {"error": message, "detail": [{"type": kind, "loc": [loc], "msg": message}], "status": status}


def error_response(status: int, kind: str, message: str, loc: str = "body"):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(status, kind, message, loc), status_code=status)


# --------------------------------------------------------------------------- feedback requests

class FeedbackError(ValueError):
    """A /feedback request that stores nothing: its HTTP status, error kind and one-line reason."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def parse_feedback(body: bytes, max_items: int = ARGS.max_feedback_items) -> dict[str, int]:
    """`{"prediction_id", "label"}` or a list of them → {id: label}, a repeated id's last label winning."""
    import json

    def bad(message: str) -> FeedbackError:
        return FeedbackError(400, "invalid_feedback", message)

    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be a label
        raise bad('the body is not JSON: send {"prediction_id": "...", "label": 7} or a list of them') from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise bad("empty list: send at least one {prediction_id, label}")
    if len(items) > max_items:
        raise bad(f"too many items: {len(items)} in one request, at most {max_items}")
    labels: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"item {i}" if isinstance(data, list) else "the body"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object with 'prediction_id' and 'label'")
        if unknown := sorted(set(item) - {"prediction_id", "label"}):
            raise bad(f"{where}: unknown field '{unknown[0]}' (expected 'prediction_id' and 'label')")
        pid, label = item.get("prediction_id"), item.get("label")
        if not isinstance(pid, str) or not pid:
            raise bad(f"{where}: 'prediction_id' must be the id string a prediction returned")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
            raise bad(f"{where}: 'label' must be an integer 0–9, got {json.dumps(label)}")
        labels[pid] = label
    return labels


PREDICTION_ID = re.compile(rb'"prediction_id":\s*"([0-9a-f]{28})"')


def with_prediction_id_header(send):
    """Wrap an ASGI `send`: a response holding exactly one prediction gets `X-Prediction-Id`.

    The response start is held until the body is complete (a prediction's body is small).
    """
    start: dict | None = None
    chunks: list[bytes] = []

    async def wrapped(message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        ids = PREDICTION_ID.findall(body) if start.get("status") == 200 else []
        if len(ids) == 1:
            start = {**start, "headers": [*start.get("headers", []), (b"x-prediction-id", ids[0])]}
        await send(start)
        start = None
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


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
        if scope.get("method") == "POST" and path.rstrip("/") in ("/predict", "/predict_image"):
            send = with_prediction_id_header(send)
        if self.api_key and not is_open(path) and not self.authorized(headers):
            resp = error_response(401, "unauthorized", "missing or wrong API key: send 'Authorization: "
                                  "Bearer <key>' or 'X-API-Key: <key>'", "header")
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
        return JSONResponse(bentoml.get_current_service().model_info().model_dump())

    async def take_feedback(request):
        try:
            labels = parse_feedback(await request.body())
        except FeedbackError as exc:
            return error_response(exc.status, exc.kind, str(exc))
        status, body = await asyncio.to_thread(bentoml.get_current_service().store_feedback, labels)
        return JSONResponse(body, status_code=status)

    routes = [Route("/model", model_info, methods=["GET"]),
              Route("/feedback", take_feedback, methods=["POST"]),
              Route("/ui", lambda _r: RedirectResponse("/ui/"), methods=["GET"])]
    if UI_DIR.is_dir():
        routes.append(Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui"))
    return Starlette(routes=routes)


# --------------------------------------------------------------------------- the service

def _metrics() -> dict:
    """Follow-mode metrics, per worker (BentoML serves them at /metrics, multiprocess-aware)."""
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "version": Gauge("mnist_served_model_version", "registered version this worker serves",
                         multiprocess_mode="liveall"),
        "reloads": Counter("mnist_model_reloads_total", "champion changes loaded and swapped in"),
        "failures": Counter("mnist_model_reload_failures_total",
                            "failed loads: refused (unloadable, failing the canary) or to be retried"),
        "behind": Gauge("mnist_follower_behind", "1 while the champion alias names a version this worker does "
                        "not serve (refused, or being retried)", multiprocess_mode="liveall"),
        "seconds": Histogram("mnist_model_reload_seconds", "seconds to load, trace and check a new version",
                             buckets=(0.5, 1, 2, 5, 10, 20, 40, 80)),
    }


METRICS = _metrics()

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
        self.mode = "follow" if os.environ.get(FOLLOW_ENV) == "1" else "pinned"
        # The floor: evaluate.min_accuracy (`mnist-mlops serve` sets it); without it, each
        # version's own gate.min_accuracy tag (a container following the champion).
        floor = os.environ.get(MIN_ACCURACY_ENV)
        self.min_accuracy = float(floor) if floor else None
        self.active = self._first_model()
        self.follower: ChampionFollower | None = None
        self._follow_task: asyncio.Task | None = None
        if self.mode == "follow":
            every = float(os.environ.get(FOLLOW_SECONDS_ENV) or ARGS.follow_seconds)
            self.follower = ChampionFollower(lambda: self.active, self._swap, every, self.min_accuracy, METRICS)
        METRICS["version"].set(float(self.active.version) if self.active.version.isdigit() else -1)
        self.log_dir, self.log = self._prediction_log()
        self.feedback = feedback.FeedbackStore(Path(os.environ.get(feedback.DIR_ENV) or "feedback").resolve())
        # Everything loaded so far (TensorFlow, MLflow, the model) lives as long as the worker:
        # keep it out of the cyclic GC's full passes, which would otherwise rescan it under load.
        gc.collect()
        gc.freeze()
        logger.info("serving %s v%s (run %s, %s) on %s, %s", MODEL_NAME, self.active.version, self.active.run_id,
                    self.active.source, self.device, self.mode)

    def _first_model(self) -> LoadedModel:
        """Pinned to a version, the champion when following (the Bento's model if the registry
        cannot be read at start), else the Bento's own model."""
        pin = os.environ.get(PIN_ENV)
        if pin:
            return load_version(pin, self.min_accuracy)  # a ReloadError stops the start: nothing to serve
        if self.mode == "follow":
            try:
                return load_version(champion_version(), self.min_accuracy)
            except Exception as exc:  # noqa: BLE001 - start on the Bento's model; the follower retries
                logger.warning("champion not loadable from the registry at start (%s): serving the Bento's "
                               "model until it is", exc)
        return self._bento_model()

    def _bento_model(self) -> LoadedModel:
        meta = dict(self.bento_model.info.metadata)
        # Keras safe mode: loading the file can never run arbitrary code.
        model = load_keras(Path(self.bento_model.path_of(KERAS_FILE)))
        return LoadedModel(version=str(meta.get("model_version", "unknown")), run_id=str(meta.get("run_id", "unknown")),
                           forward=compile_forward(model), source=f"bento {self.bento_model.tag}",
                           data_md5=meta.get("data_md5"), test_accuracy=meta.get("test_accuracy"))

    @staticmethod
    def _prediction_log() -> tuple[Path, prediction_log.PredictionLog | None]:
        """This worker's log writer (None when `serve.log_predictions` is off)."""
        directory = Path(os.environ.get(prediction_log.DIR_ENV) or "logs/predictions").resolve()
        on = os.environ.get(prediction_log.ON_ENV)
        if not (ARGS.log_predictions if on is None else on == "1"):
            return directory, None
        max_mb = float(os.environ.get(prediction_log.MAX_MB_ENV) or ARGS.log_max_mb)
        return directory, prediction_log.PredictionLog(directory, max_mb)

    def _swap(self, new: LoadedModel) -> None:
        """One reference: a request reads it once, so it meets the old model or the new one.

        The old model was frozen out of the GC at startup (or at the last swap): unfreeze,
        collect it, and freeze what is left, so a rollout does not leak the model it replaced.
        """
        self.active = new
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    @bentoml.on_startup
    async def start_following(self) -> None:
        """Each worker follows by itself: an asyncio task, blocking work in threads."""
        if self.follower is not None:
            self._follow_task = asyncio.create_task(self.follower.run())

    @bentoml.on_shutdown
    async def stop_following(self) -> None:
        if self._follow_task is not None:
            self._follow_task.cancel()
        if self.log is not None:
            await asyncio.to_thread(self.log.close)  # what is queued is written before the worker exits

    def find_predictions(self, ids: set[str]) -> dict[str, tuple[dict, np.ndarray]]:
        """Logged predictions by id, this worker's queue written first. An id made in the last
        moments by another worker may still be in that worker's queue: wait one flush for it."""
        if self.log is not None:
            self.log.flush()
        found = prediction_log.find(self.log_dir, ids)
        now = time.time()
        fresh = {i for i in ids - found.keys()
                 if (t := prediction_log.id_time(i)) is not None and 0 <= now - t < 4 * prediction_log.FLUSH_SECONDS}
        if fresh:
            time.sleep(2 * prediction_log.FLUSH_SECONDS + 0.1)
            found |= prediction_log.find(self.log_dir, fresh)
        return found

    def store_feedback(self, labels: dict[str, int]) -> tuple[int, dict]:
        """Store every label, or none: an unknown prediction id is a 404 for the whole request."""
        found = self.find_predictions(set(labels))
        missing = [i for i in labels if i not in found]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            why = " (the prediction log is off: serve.log_predictions=false)" if self.log is None else ""
            return 404, error_body(404, "unknown_prediction", f"unknown prediction_id {missing[0]!r}{more}{why}",
                                   "prediction_id")
        images = np.stack([found[pid][1] for pid in labels])
        if not (inked := has_ink(images)).all():
            blank = [pid for pid, ok in zip(labels, inked, strict=True) if not ok]
            more = f" and {len(blank) - 1} more" if len(blank) > 1 else ""
            return 400, error_body(400, "no_ink", f"prediction {blank[0]!r}{more} was of a blank digit (no ink): "
                                   "there is no digit to label", "prediction_id")
        records = [{"label": label, "source": "feedback", "prediction_id": pid, "predicted": found[pid][0]["digit"],
                    "model_version": found[pid][0]["model_version"]} for pid, label in labels.items()]
        try:
            self.feedback.add(records, images)
        except OSError as exc:  # a full disk: nothing was stored (the append is all or nothing)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            status = 507 if full else 503
            logger.error("feedback store: %d labels not stored: %s", len(records), exc)
            return status, error_body(status, "storage_full" if full else "storage_unavailable",
                                      f"labels not stored: {exc.strerror or exc}; nothing was stored, "
                                      "send them again later", "body")
        return 200, {"stored": len(records),
                     "items": [{k: r[k] for k in ("prediction_id", "label", "predicted")} for r in records]}

    def model_info(self) -> ModelInfo:
        a, f = self.active, self.follower
        return ModelInfo(model_name=MODEL_NAME, model_version=a.version, run_id=a.run_id, data_md5=a.data_md5,
                         test_accuracy=a.test_accuracy, canary_accuracy=a.canary_accuracy, source=a.source,
                         loaded_at=a.loaded_at, mode=self.mode, last_reload_error=f.state.last_error if f else None,
                         registry_reachable=f.state.registry_reachable if f else None,
                         champion_version=f.state.champion if f else None,
                         behind=f.state.behind(a.version) if f else None,
                         refused_version=f.state.refused if f else None,
                         bento_builtin_model=str(self.bento_model.tag), device=self.device)

    def probabilities(self, x: np.ndarray, active: LoadedModel | None = None) -> np.ndarray:
        if NOOP_MODEL:
            return np.full((len(x), 10), 0.1, np.float32)
        return (active or self.active).forward(x)

    def predictions(self, x: np.ndarray, endpoint: str) -> list[dict]:
        active = self.active  # read once: the whole batch is answered by one model
        probs = self.probabilities(x, active)
        digits = probs.argmax(axis=1)
        blank = ~has_ink(prediction_log.to_uint8(x))
        ids = prediction_log.new_ids(len(x))
        if self.log is not None:
            self.log.record(ids, endpoint, active.version, probs, x)
        return [{"prediction_id": i, "digit": int(d), "confidence": float(p[d]), "probabilities": p.tolist(),
                 "model_version": active.version, "blank": bool(b)}
                for i, d, p, b in zip(ids, digits, probs, blank, strict=True)]

    @bentoml.api(batchable=True, max_batch_size=ARGS.max_batch_size, max_latency_ms=ARGS.max_latency_ms)
    def predict(self, images: Images) -> list[Prediction]:
        """Classify 28×28 digits: one prediction per image, in order."""
        return self.predictions(images, "predict")

    @bentoml.api
    def predict_image(self, image: Path) -> Prediction:
        """Classify a PNG/JPEG digit of any size (dark ink on light paper, or light on dark)."""
        from mnist_mlops.imaging import ImageError, ImageTooLarge, image_to_input

        try:
            data = image.read_bytes()
            x = image_to_input(data, ARGS.max_image_pixels, ARGS.max_image_bytes)
        except ImageTooLarge as exc:
            return error_response(413, "image_too_large", str(exc), "image")
        except ImageError as exc:
            return error_response(400, "invalid_image", str(exc), "image")
        return Prediction(**self.predictions(x, "predict_image")[0])


MnistClassifier.add_asgi_middleware(Guard)
