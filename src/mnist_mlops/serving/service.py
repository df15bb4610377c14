"""The BentoML service: the MLflow champion behind HTTP, batched, on CPU or GPU. Wiring only.

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
- /v2/...              the Open Inference Protocol (KServe V2): health, metadata, infer (serving/oip).
- /healthz /livez /readyz /metrics (Prometheus) and the OpenAPI page at / — BentoML's own; the
  document it reads, /docs.json, is ours (serving/openapi: every endpoint, true schemas).

Where the rest lives: input checks (inputs: bad input never reaches the model, and fails
only its own request), the body limit, API key and `X-Prediction-Id` header (http: an ASGI
middleware in front of everything), /model, /feedback and /ui/ (routes), the build arguments
and the environment (settings), following the champion (follow), devices (platform.devices).

Every prediction carries a `prediction_id` and is recorded in the prediction log
(mnist_mlops.records.prediction_log), off the request path; `serve.log_predictions: false`
turns that off. Modes: `mnist-mlops serve` *follows* the registry's champion alias by default
and swaps models without a restart; `--pin VERSION` serves one registered version; a Bento
served as built (`bentoml serve`, a container) serves its own model. Each worker does this by
itself. Inference: on a CPU host the version's LiteRT file (mnist_mlops.litert: the worker never
imports TensorFlow); on a GPU host, or for a version without one, one `tf.function` traced once
for any batch size, never `model.predict` (~50 ms a call).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import bentoml
import numpy as np
from pydantic import BaseModel, Field

from mnist_mlops.config import MODEL_NAME
from mnist_mlops.digit_features import has_ink
from mnist_mlops.platform.devices import configure_tensorflow, gpu_count
from mnist_mlops.preprocess import to_uint8
from mnist_mlops.records import feedback, prediction_log
from mnist_mlops.scoring import load_keras
from mnist_mlops.serving import openapi, routes, settings
from mnist_mlops.serving.follow import (
    ChampionFollower,
    LoadedModel,
    champion_version,
    compile_forward,
    follower_metrics,
    load_version,
)
from mnist_mlops.serving.http import Guard, error_response
from mnist_mlops.serving.inputs import images_type
from mnist_mlops.serving.package import KERAS_FILE

logger = logging.getLogger("mnist_mlops.serving.service")

# Bound each time this module is imported (a build reloads it with that build's arguments).
ARGS = settings.build_args()
Images = images_type(ARGS.max_images_per_request)


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
    runtime: str = Field(description="litert (the version's LiteRT file, on CPU) or tensorflow")
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


@bentoml.service(**settings.service_config(ARGS))
@bentoml.asgi_app(routes.extra_app(ARGS.max_feedback_items), path="/", name="extras")
class MnistClassifier:
    bento_model = bentoml.models.BentoModel(ARGS.model)

    def __init__(self) -> None:
        logging.getLogger("mnist_mlops").setLevel(logging.INFO)  # BentoML's root level would hide model swaps
        settings.refuse_anonymous_exposure(logger)
        # TensorFlow only where it serves: a GPU host. On CPU, LiteRT (mnist_mlops.litert) answers.
        self.device = configure_tensorflow() if gpu_count() else "cpu"
        self.env = settings.runtime(ARGS)
        self.mode = "follow" if self.env.follow else "pinned"
        # The floor: evaluate.min_accuracy (`mnist-mlops serve` sets it); without it, each
        # version's own gate.min_accuracy tag (a container following the champion).
        self.min_accuracy = self.env.min_accuracy
        self.active = self._first_model()
        self.follower: ChampionFollower | None = None
        self._follow_task: asyncio.Task | None = None
        metrics = follower_metrics()
        if self.mode == "follow":
            self.follower = ChampionFollower(lambda: self.active, self._swap, self.env.follow_seconds,
                                             self.min_accuracy, metrics)
        metrics["version"].set(float(self.active.version) if self.active.version.isdigit() else -1)
        log = (prediction_log.PredictionLog(self.env.log_dir, self.env.log_max_mb)
               if self.env.log_predictions else None)
        self.log = log
        self.intake = routes.FeedbackIntake(self.env.log_dir, log, feedback.FeedbackStore(self.env.feedback_dir))
        # Everything loaded so far (TensorFlow, MLflow, the model) lives as long as the worker:
        # keep it out of the cyclic GC's full passes, which would otherwise rescan it under load.
        gc.collect()
        gc.freeze()
        logger.info("serving %s v%s (run %s, %s) on %s, %s", MODEL_NAME, self.active.version, self.active.run_id,
                    self.active.source, self.device, self.mode)

    def _first_model(self) -> LoadedModel:
        """Pinned to a version, the champion when following (the Bento's model if the registry
        cannot be read at start), else the Bento's own model."""
        if self.env.pin:
            return load_version(self.env.pin, self.min_accuracy)  # a ReloadError stops the start: nothing to serve
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

    def model_info(self) -> ModelInfo:
        a, f = self.active, self.follower
        return ModelInfo(model_name=MODEL_NAME, model_version=a.version, run_id=a.run_id, data_md5=a.data_md5,
                         test_accuracy=a.test_accuracy, canary_accuracy=a.canary_accuracy, source=a.source,
                         runtime=a.runtime,
                         loaded_at=a.loaded_at, mode=self.mode, last_reload_error=f.state.last_error if f else None,
                         registry_reachable=f.state.registry_reachable if f else None,
                         champion_version=f.state.champion if f else None,
                         behind=f.state.behind(a.version) if f else None,
                         refused_version=f.state.refused if f else None,
                         bento_builtin_model=str(self.bento_model.tag), device=self.device)

    def probabilities(self, x: np.ndarray, active: LoadedModel | None = None) -> np.ndarray:
        if self.env.noop_model:
            return np.full((len(x), 10), 0.1, np.float32)
        return (active or self.active).forward(x)

    def predictions(self, x: np.ndarray, endpoint: str) -> list[dict]:
        active = self.active  # read once: the whole batch is answered by one model
        probs = self.probabilities(x, active)
        digits = probs.argmax(axis=1)
        blank = ~has_ink(to_uint8(x))
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


MnistClassifier.add_asgi_middleware(
    Guard, max_body_bytes=ARGS.max_body_bytes,
    document=lambda: openapi.document(MnistClassifier.openapi_spec.asdict(), ModelInfo.model_json_schema()))
