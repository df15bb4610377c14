"""The lineage card of a prediction or of a model version, as plain data (JSON-ready).

Nothing here is recorded anew: a prediction's record and digit come from the prediction log,
its label from the feedback store, the model version's scores, data version and gate decision
from its registry tags, the code, flow run and trigger from its training run's tags, the labels
its data version held from the run's `data/feedback.json` (logged by the train stage), and the
window's verdict from the monitor's run. The card joins them and says which link opens each.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from mnist_mlops import redact
from mnist_mlops.config import MODEL_NAME, Params
from mnist_mlops.errors import UserError
from mnist_mlops.records import feedback, prediction_log, shards, verdicts

LISTING = "data/feedback.json"  # the training run's artifact: the labelled digits its data version held
SCORES = ("test_accuracy", "robust_accuracy", "foreign_accuracy", "foreign_worst_class", "feedback_accuracy")
MONITOR_RUNS = 500  # the newest monitoring runs searched for the window a prediction fell in


class BadPredictionId(UserError):
    """Not an id the service makes (HTTP 400)."""


class UnknownPrediction(UserError):
    """A well-formed id that neither the prediction log nor the feedback store knows (HTTP 404)."""


@dataclass(frozen=True)
class Links:
    """Where the UIs that the card links to answer."""

    mlflow: str  # the MLflow UI: the tracking server, or `mnist-mlops ui` on a local store
    prefect: str  # the Prefect UI: PREFECT_API_URL's server, or `mnist-mlops prefect-ui`

    @classmethod
    def from_env(cls, tracking_uri: str) -> Links:
        from mnist_mlops.platform.prefect_server import DEFAULT_UI_PORT

        api = os.environ.get("PREFECT_API_URL")
        mlflow = redact.without_credentials(tracking_uri) if tracking_uri.startswith("http") else "http://127.0.0.1:5000"
        prefect = api.rstrip("/").removesuffix("/api") if api else f"http://127.0.0.1:{DEFAULT_UI_PORT}"
        return cls(mlflow.rstrip("/"), prefect)


def prediction_card(log_dir: Path, feedback_dir: Path, prediction_id: str, links: Links) -> dict:
    """Everything behind one answer: the prediction, its label, the model version and its lineage."""
    at = prediction_log.id_time(prediction_id)
    if at is None:
        raise BadPredictionId(f"{prediction_id!r} is not a prediction id: /predict returns 28 hex digits")
    found = prediction_log.find(log_dir, {prediction_id}).get(prediction_id)
    label = newest_label(feedback_dir, prediction_id)
    if found is None and label is None:
        raise UnknownPrediction(f"unknown prediction {prediction_id}: {absent_because(log_dir, at)}")
    record, image = found if found else (None, label[1])
    version = str(record["model_version"] if record else label[0].get("model_version"))
    return {"prediction": prediction_part(prediction_id, at, record, image, log_dir),
            "label": label_part(label[0] if label else None, feedback_dir),
            "model": model_part(version, links, at)}


def model_part(version: str, links: Links, at: float) -> dict | None:
    """The answering version's card; the error in one line when the registry cannot give it."""
    if version in ("None", ""):
        return None
    try:
        return version_card(version, links, at)
    except Exception as exc:  # noqa: BLE001 - the prediction's own part is still worth showing
        return {"version": version, "error": str(exc).strip().splitlines()[0][:300]}


def absent_because(log_dir: Path, at: float) -> str:
    oldest = min(filter(None, map(shards.started, shards.shard_stems(log_dir, prediction_log.PREFIX))), default=None)
    if oldest is not None and at < oldest:
        return (f"made {iso(at)}, before the oldest record the prediction log still holds ({iso(oldest)}): "
                "older than its retention (serve.log_max_mb)")
    return f"no answer with this id in {log_dir} and no label for it"


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def newest_label(feedback_dir: Path, prediction_id: str) -> tuple[dict, np.ndarray] | None:
    """The newest label given for this prediction (with the digit it labels), None without one."""
    batch = feedback.read_all(feedback_dir)
    rows = [i for i, r in enumerate(batch.records) if r.get("prediction_id") == prediction_id]
    if not rows:
        return None
    newest = max(rows, key=lambda i: (batch.records[i]["time"], i))
    return batch.records[newest], batch.images[newest]


def prediction_part(prediction_id: str, at: float, record: dict | None, image: np.ndarray, log_dir: Path) -> dict:
    part = {"id": prediction_id, "time": record["time"] if record else iso(at), "in_log": record is not None,
            "image": np.asarray(image, np.uint8).tolist()}
    if record is None:
        part["note"] = absent_because(log_dir, at)
        return part
    probs = np.asarray(record["probabilities"], float)
    top = np.argsort(probs)[::-1][:3]
    return part | {"endpoint": record["endpoint"], "digit": int(record["digit"]),
                   "confidence": float(record["confidence"]), "model_version": str(record["model_version"]),
                   "top3": [{"digit": int(d), "probability": round(float(probs[d]), 4)} for d in top]}


def label_part(record: dict | None, feedback_dir: Path) -> dict | None:
    """The label and what became of it: in which data versions (and model versions) it is used,
    or what the screening (and a person's review) made of it."""
    if record is None:
        return None
    used = versions_holding(record["sha"])
    verdict = verdicts.read(feedback_dir).get(verdicts.key(record), {})
    part = {"label": int(record["label"]), "time": record["time"], "source": record.get("source"),
            "used_in": used, "verdict": verdict.get("verdict")}
    if verdict.get("verdict") in (verdicts.QUARANTINED, verdicts.REJECTED) and not used:
        part["state"] = (f"quarantined as a likely label error (model v{verdict.get('model_version')} read "
                         f"{verdict.get('predicted')}, score {verdict.get('score')}): `mnist-mlops feedback review`"
                         if verdict["verdict"] == verdicts.QUARANTINED else "rejected in `mnist-mlops feedback review`")
    elif used:
        data = sorted({u["data_md5"] for u in used})
        part["state"] = f"used in data version {', '.join(data)} (model {', '.join('v' + u['version'] for u in used)})"
    elif later := [v for v in registered_versions() if newer(v.tags.get("data.feedback_newest"), record["time"])]:
        part["state"] = (f"held back: data version {later[0].tags.get('data.md5')} was cut after it without it "
                         "(screened: a copy of a base test digit, or over the class cap)")
    else:
        part["state"] = "accepted: waiting for the next data version"
    return part


def newer(value: str | None, than: str) -> bool:
    return bool(value) and value not in ("None", "none") and prediction_log.parse_time(value) >= \
        prediction_log.parse_time(than)


def registered_versions() -> list:
    """Every registered version, newest first."""
    import mlflow

    found = mlflow.MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def versions_holding(sha: str) -> list[dict]:
    """The registered versions whose data version held the labelled digit with this sha."""
    hits = []
    for version in registered_versions():
        if (version.tags.get("data.feedback_count") or "0") == "0":
            continue
        listing = data_listing(version.run_id)
        if listing and any(entry["sha"] == sha for entry in listing.get("labels", [])):
            hits.append({"version": str(version.version), "data_md5": version.tags.get("data.md5"),
                         "run_id": version.run_id})
    return hits


@lru_cache(maxsize=256)
def data_listing(run_id: str) -> dict | None:
    """The training run's `data/feedback.json` (base count, labels in row order), None without one."""
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{LISTING}")
    except Exception:  # noqa: BLE001 - no feedback in that data version (or an older run without it)
        return None


def version_card(version: str, links: Links, at: float | None = None) -> dict:
    """A model version's lineage: its run, code, data version, params, scores, decisions and links."""
    import mlflow

    from mnist_mlops import registry

    mv = registry.get_version(version)
    run = mlflow.MlflowClient().get_run(mv.run_id)
    tags, run_tags = mv.tags, run.data.tags
    return {"version": str(mv.version), "champion": registry.champion_version() == str(mv.version),
            "registered": iso(mv.creation_timestamp / 1000), "run_id": mv.run_id,
            "run_name": run_tags.get("mlflow.runName"), "git_commit": run_tags.get("git.commit"),
            "data": data_part(tags, run), "params_changed": params_changed(run.data.params),
            "scores": {k: float(tags[k]) for k in SCORES if tags.get(k) not in (None, "", "None")},
            "decision": decision_part(tags, run_tags),
            "links": links_part(links, run, at)}


def data_part(tags: dict, run) -> dict:
    listing = data_listing(run.info.run_id) or {}
    split_rows = [json.loads(d.dataset.profile)["features_shape"][0] for d in run.inputs.dataset_inputs
                  if "features_shape" in (d.dataset.profile or "")]  # the train, val and test splits
    feedback_count = int(tags.get("data.feedback_count") or 0)
    return {"md5": tags.get("data.md5"), "source": run.data.tags.get("data.source"),
            "base_digits": listing.get("base", sum(split_rows) - feedback_count if split_rows else None),
            "feedback_digits": feedback_count, "newest_label": listing.get("newest")}


def params_changed(logged: dict[str, str]) -> dict[str, dict[str, str]]:
    """The run's params that are not the defaults (as MLflow holds them: strings)."""
    defaults = {k: str(v) for k, v in Params().flat().items()}
    return {k: {"value": v, "default": defaults[k]} for k, v in sorted(logged.items())
            if k in defaults and v != defaults[k]}


def decision_part(tags: dict, run_tags: dict) -> dict:
    """The gate's verdict and reason, and who or what made it champion."""
    from mnist_mlops.registry import TAG_DECISION, TAG_PREVIOUS, TAG_REASON

    verdict, reason = tags.get(TAG_DECISION), tags.get(TAG_REASON, "")
    trigger = run_tags.get("trigger", "manual")
    if reason.startswith("manual promotion"):
        by = "a person, with `mnist-mlops promote`"
    elif reason.startswith("rolled back from"):
        by = "a person, with `mnist-mlops rollback`"
    else:
        why = run_tags.get("trigger.reason")
        by = f"the training flow ({trigger}{': ' + why if why else ''})"
    if verdict == "rolled_back":
        by = "champion until a person rolled it back (`mnist-mlops rollback`)"
    return {"verdict": verdict, "reason": reason, "previous_champion": tags.get(TAG_PREVIOUS),
            "trigger": trigger, "decided_by": by if verdict in ("promoted", "rolled_back") else None}


def links_part(links: Links, run, at: float | None) -> dict:
    flow_run = run.data.tags.get("prefect.flow_run_id")
    out = {"mlflow_run": f"{links.mlflow}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                         "?workflowType=machine_learning",
           "prefect_flow_run": f"{links.prefect}/runs/flow-run/{flow_run}" if flow_run not in (None, "none") else None,
           "monitoring_run": None}
    if at is not None and (window := monitoring_window(at)):
        out["monitoring_run"] = f"{links.mlflow}/#/experiments/{window.info.experiment_id}/runs/{window.info.run_id}"
    return out


def monitoring_window(at: float):
    """The newest monitoring run whose window holds the moment `at`, None when no check covered it."""
    import mlflow

    from mnist_mlops.platform.tracking import MONITORING_EXPERIMENT

    experiment = mlflow.get_experiment_by_name(MONITORING_EXPERIMENT)
    if experiment is None:
        return None
    moment = datetime.fromtimestamp(at, UTC)
    for run in mlflow.MlflowClient().search_runs([experiment.experiment_id], max_results=MONITOR_RUNS,
                                                 order_by=["attributes.start_time DESC"]):
        p = run.data.params
        if "window_start" in p and "window_end" in p and utc(p["window_start"]) <= moment <= utc(p["window_end"]):
            return run
    return None


def utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
