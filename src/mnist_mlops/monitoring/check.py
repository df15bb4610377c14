"""One monitoring check: read a window of the prediction log and the labels, compare with the
champion's reference, and decide whether there is a reason to retrain."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from mnist_mlops.config import Params, Paths
from mnist_mlops.digit_features import feature_arrays
from mnist_mlops.monitoring import drift
from mnist_mlops.monitoring.accuracy import Accuracy, by_version
from mnist_mlops.monitoring.reference import Reference
from mnist_mlops.records import feedback, prediction_log, shards

NO_TRAFFIC = "no traffic"
TOO_FEW = "too few predictions to judge drift"
LOWEST_SHOWN = 36  # lowest-confidence digits drawn in the report


@dataclass(frozen=True)
class Traffic:
    """The valid predictions of a window, and how many records were skipped as corrupt."""

    records: list[dict]
    images: np.ndarray
    skipped: int

    @property
    def predicted(self) -> np.ndarray:
        return np.array([r["digit"] for r in self.records], np.int64)

    @property
    def confidence(self) -> np.ndarray:
        return np.array([r["confidence"] for r in self.records], np.float32)


def _valid(record: dict) -> bool:
    digit, conf = record.get("digit"), record.get("confidence")
    return (isinstance(digit, int) and 0 <= digit <= 9 and isinstance(conf, int | float)
            and 0 <= conf <= 1 and isinstance(record.get("model_version"), str))


def read_traffic(log_dir: Path, start: datetime, end: datetime) -> Traffic:
    """The window's predictions; records without a readable time or answer are counted, not read."""
    unreadable = 0

    def in_window(record: dict) -> bool:
        nonlocal unreadable
        try:
            t = prediction_log.parse_time(record["time"])
        except (KeyError, TypeError, ValueError):
            unreadable += 1
            return False
        return start <= t < end

    batch = shards.read(log_dir, prediction_log.PREFIX, in_window)
    ok = [i for i, r in enumerate(batch.records) if _valid(r)]
    return Traffic([batch.records[i] for i in ok], batch.images[ok], batch.skipped + unreadable + len(batch) - len(ok))


def labels_in(examples: feedback.Examples, start: datetime, end: datetime) -> list[dict]:
    """The labels people gave in the window (one per digit, its newest label)."""
    return [r for r in examples.records if start <= prediction_log.parse_time(r["time"]) < end]


def new_labels(paths: Paths, params: Params) -> int:
    """Labels accepted since the data version in data/ was made (its data/feedback.json, which
    the training flow's fetch step writes), i.e. what a training run would add now: screened by
    the fetch step's own code, so a label it would hold back (a blank digit, a copy of a test
    digit, a quarantined label, an over-full class) never asks for a retrain that cannot change
    anything. It judges nothing itself: a label not screened yet counts."""
    from mnist_mlops.training.data import DataError
    from mnist_mlops.training.fetch import base_of, screened_labels

    try:
        base, meta = base_of(paths.data)
    except DataError:  # no data version yet: every usable label is new
        return len(feedback.accepted(paths.feedback))
    screened = screened_labels(base, paths.feedback, params, judge=False)
    return feedback.newer_than(screened.examples, meta["newest"] if meta else None)


@dataclass
class Result:
    start: datetime
    end: datetime
    champion: str
    traffic: Traffic
    checks: list[drift.Check] = field(default_factory=list)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # of the window's digits, once judged
    low_confidence: tuple[float, float] | None = None  # share in the window, share in the reference
    accuracy: dict[str, Accuracy] = field(default_factory=dict)
    new_labels: int = 0
    verdict: str = "ok"
    reasons: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> list[str]:
        return [c.name for c in self.checks if c.drifted]

    @property
    def volume(self) -> dict[str, int]:
        return dict(sorted(Counter(r["model_version"] for r in self.traffic.records).items()))

    def lowest(self, n: int = LOWEST_SHOWN) -> tuple[np.ndarray, list[dict]]:
        order = np.argsort(self.traffic.confidence, kind="stable")[:n]
        return self.traffic.images[order], [self.traffic.records[i] for i in order]

    def metrics(self) -> dict[str, float]:
        """What the monitor's MLflow run logs (charted over time in the MLflow UI)."""
        out = {"predictions": float(len(self.traffic.records)), "skipped_records": float(self.traffic.skipped),
               "new_labels": float(self.new_labels), "drift": float(bool(self.drifted)),
               "retrain": float(bool(self.reasons))}
        for c in self.checks:
            out[f"{'psi' if c.name == 'classes' else 'ks'}_{c.name}"] = c.effect
            out[f"p_{c.name}"] = c.p_value
        if self.low_confidence:
            out["low_confidence_share"] = self.low_confidence[0]
        live = self.accuracy.get("all")
        if live is not None and live.n:
            out |= {"live_accuracy": live.value, "live_labels": float(live.n)}
        return out

    def summary(self) -> dict[str, str]:
        """Rows for the console, the Prefect artifact and the report's head."""
        live = self.accuracy.get("all")
        rows = {
            "window": f"{self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC",
            "champion": f"v{self.champion}",
            "predictions": f"{len(self.traffic.records)}"
                           + (f" ({', '.join(f'v{v}: {n}' for v, n in self.volume.items())})" if self.volume else ""),
            "skipped records": f"{self.traffic.skipped} (corrupt or truncated)",
            "verdict": self.verdict,
            "drifted": ", ".join(self.drifted) or "nothing",
            "live accuracy": (f"{live.value:.3f} (95% CI {live.low:.3f}-{live.high:.3f}) on {live.n} labels"
                              if live is not None and live.n else "no labels in the window"),
            "new labels since data/": str(self.new_labels),
            "retrain": "; ".join(self.reasons) if self.reasons else "no: nothing calls for it",
        }
        return rows


def run_check(paths: Paths, params: Params, reference: Reference, start: datetime, end: datetime,
              log_dir: Path | None = None) -> Result:
    """Everything the monitor measures over [start, end), and its decision. The labels are the
    store the service writes and the fetch step reads (`Paths.feedback`)."""
    m = params.monitor
    traffic = read_traffic(log_dir or paths.prediction_log, start, end)
    result = Result(start, end, reference.version, traffic)
    result.accuracy = by_version(labels_in(feedback.accepted(paths.feedback), start, end))
    result.new_labels = new_labels(paths, params) if params.data.feedback else 0
    n = len(traffic.records)
    if n == 0:
        result.verdict = NO_TRAFFIC
    elif n < m.min_predictions:
        result.verdict = f"{TOO_FEW} ({n} < monitor.min_predictions {m.min_predictions})"
    else:
        result.features = feature_arrays(traffic.images)
        result.checks = drift.checks(reference, traffic.predicted, traffic.confidence, result.features,
                                     m.drift_threshold, m.p_value)
        result.verdict = "drift" if result.drifted else "ok"
    if n:
        result.low_confidence = (float((traffic.confidence < m.low_confidence).mean()),
                                 float((reference.confidence < m.low_confidence).mean()))
    result.reasons = reasons(result, params)
    return result


def reasons(result: Result, params: Params) -> list[str]:
    """Why to retrain, in words; empty when nothing calls for it.

    Live accuracy is judged on the champion's own answers only (an old version's errors say
    nothing about the model serving now), and only when even the upper end of its 95 % Wilson
    interval is below the floor: 18 of 20 right is no evidence against a 0.97 model.
    """
    out = []
    moved = [c for c in result.checks if c.drifted]
    if moved:
        out.append("drift in " + ", ".join(f"{c.name} ({'PSI' if c.name == 'classes' else 'KS D'} {c.effect:.2f})"
                                           for c in moved)
                   + f" >= monitor.drift_threshold {params.monitor.drift_threshold:g}")
    live = result.accuracy.get(result.champion)
    floor = params.evaluate.min_accuracy
    if live is not None and live.n >= params.monitor.min_labels and live.high < floor:
        out.append(f"live accuracy of champion v{result.champion} {live.value:.3f} (95% CI up to {live.high:.3f}) "
                   f"on {live.n} labels < evaluate.min_accuracy {floor:g}")
    if params.data.feedback and result.new_labels >= max(1, params.data.feedback_min_new):
        out.append(f"{result.new_labels} new labels >= data.feedback_min_new {params.data.feedback_min_new}")
    return out


def evidence(result: Result, data_md5: str | None) -> str:
    """A fingerprint of what a retrain would be started for: the champion, the data version,
    what drifted, the champion's labels and the new labels. A check that finds the same
    fingerprint as the one that last started a retrain does not start another (drift lasts
    until the data changes; a retrain on the same evidence would change nothing)."""
    import hashlib
    import json

    live = result.accuracy.get(result.champion)
    facts = {"champion": result.champion, "data": data_md5, "drifted": sorted(result.drifted),
             "labels": [live.n, live.correct] if live is not None else None, "new_labels": result.new_labels}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
