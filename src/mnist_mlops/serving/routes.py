"""The routes beside the BentoML APIs, in one Starlette app: GET /model, POST /feedback,
GET /feedback/queue (the labelling queue), GET /predictions/{id} (a prediction's lineage card), /ui/,
and the Open Inference Protocol's health and metadata under /v2 (serving/oip.py).

POST /feedback stores a person's label for an earlier prediction: every label of a request
or none (`FeedbackIntake.store`), the digit copied from the prediction log into the feedback
store (mnist_mlops.records).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.digit_features import has_ink
from mnist_mlops.records import feedback, prediction_log
from mnist_mlops.serving import oip
from mnist_mlops.serving.http import error_body, error_response
from mnist_mlops.serving.inputs import DEFAULTS, FeedbackError, parse_feedback

logger = logging.getLogger("mnist_mlops.serving.routes")
UI_DIR = Path(__file__).resolve().parent / "ui"
MAX_QUEUE = 100  # questions per GET /feedback/queue


@dataclass
class FeedbackIntake:
    """A worker's side of /feedback: its prediction log (None when off) and the feedback store."""

    log_dir: Path
    log: prediction_log.PredictionLog | None
    feedback_store: feedback.FeedbackStore


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

    def store(self, labels: dict[str, int]) -> tuple[int, dict]:
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
            self.feedback_store.add(records, images)
        except OSError as exc:  # a full disk: nothing was stored (the append is all or nothing)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            status = 507 if full else 503
            logger.error("feedback store: %d labels not stored: %s", len(records), exc)
            return status, error_body(status, "storage_full" if full else "storage_unavailable",
                                      f"labels not stored: {exc.strerror or exc}; nothing was stored, "
                                      "send them again later", "body")
        return 200, {"stored": len(records),
                     "items": [{k: r[k] for k in ("prediction_id", "label", "predicted")} for r in records]}

    def questions(self, n: int) -> dict:
        """GET /feedback/queue: the unlabelled predictions a label would teach most about."""
        from mnist_mlops.lineage.render import png_data_url
        from mnist_mlops.records import queue

        if self.log is not None:
            self.log.flush()
        items = queue.queue(self.log_dir, self.feedback_store.directory, n)
        return {"criterion": queue.CRITERION, "items": [
            {"prediction_id": q.prediction_id, "digit": q.digit, "confidence": round(q.confidence, 4),
             "margin": q.margin, "model_version": q.model_version, "time": q.time,
             "image": png_data_url(q.image, scale=1)}
            for q in items]}

    def card(self, prediction_id: str) -> tuple[int, dict]:
        if self.log is not None:
            self.log.flush()  # an answer given a moment ago is in the log
        return prediction_card(self.log_dir, self.feedback_store.directory, prediction_id)


def prediction_card(log_dir: Path, feedback_dir: Path, prediction_id: str) -> tuple[int, dict]:
    """GET /predictions/{id}: the lineage card as JSON (the digit as a PNG data URL); 400 for
    what is not an id, 404 for an id neither the log nor the labels know."""
    from mnist_mlops.lineage import card, render

    try:
        import mlflow

        links = card.Links.from_env(mlflow.get_tracking_uri())
    except ImportError:  # a Bento image without MLflow: the card's model part says it cannot be read
        links = card.Links.from_env("")
    try:
        found = card.prediction_card(log_dir, feedback_dir, prediction_id, links)
    except card.BadPredictionId as exc:
        return 400, error_body(400, "bad_prediction_id", str(exc), "prediction_id")
    except card.UnknownPrediction as exc:
        return 404, error_body(404, "unknown_prediction", str(exc), "prediction_id")
    return 200, render.for_json(found)


def extra_app(max_feedback_items: int = DEFAULTS.max_feedback_items):
    """GET /model, POST /feedback and the static drawing page at /ui/ (the service instance's)."""
    import bentoml
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, RedirectResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def model_info(_request):
        return JSONResponse(bentoml.get_current_service().model_info().model_dump())

    async def lineage(request):
        status, body = await asyncio.to_thread(bentoml.get_current_service().intake.card,
                                               request.path_params["prediction_id"])
        return JSONResponse(body, status_code=status)

    async def take_feedback(request):
        try:
            labels = parse_feedback(await request.body(), max_feedback_items)
        except FeedbackError as exc:
            return error_response(exc.status, exc.kind, str(exc))
        status, body = await asyncio.to_thread(bentoml.get_current_service().intake.store, labels)
        return JSONResponse(body, status_code=status)

    async def label_queue(request):
        raw = request.query_params.get("n", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_QUEUE:
            return error_response(400, "bad_n", f"n must be an integer 1–{MAX_QUEUE}, not {raw!r}", "query")
        body = await asyncio.to_thread(bentoml.get_current_service().intake.questions, int(raw))
        return JSONResponse(body)

    routes = [Route("/model", model_info, methods=["GET"]),
              Route("/feedback", take_feedback, methods=["POST"]),
              Route("/feedback/queue", label_queue, methods=["GET"]),
              Route("/predictions/{prediction_id}", lineage, methods=["GET"]),
              Route("/ui", lambda _r: RedirectResponse("/ui/"), methods=["GET"]),
              *oip.routes()]
    if UI_DIR.is_dir():
        routes.append(Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui"))
    return Starlette(routes=routes)
