"""The labelling queue: the logged predictions a label would teach the model most about.

People willing to label are asked about the answers the model was least sure of, not about
whatever they happened to draw (margin sampling, the standard uncertainty criterion of active
learning): the smallest gap between the top two probabilities first. Near-copies of a digit
already queued are left out, so twenty versions of one blurred stroke do not fill the queue.
A prediction leaves the queue once it is labelled (its id is in the feedback store), and a
blank input never enters it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.digit_features import has_ink
from mnist_mlops.records import feedback, prediction_log, shards

CRITERION = ("margin: the smallest difference between the two most probable digits first; "
             "near-copies of a digit already queued left out")
# Two digits this close (RMS pixel difference, of 255) are one question: the closest two
# distinct sample digits are 12.2 apart (as feedback.NEAR_COPY_RMS measured).
SAME_QUESTION_RMS = 12.0
WINDOW = 20_000  # the newest logged predictions considered


@dataclass(frozen=True)
class Question:
    prediction_id: str
    digit: int
    confidence: float
    margin: float
    model_version: str
    time: str
    image: np.ndarray  # uint8 28×28


def margins(probs: np.ndarray) -> np.ndarray:
    """Top probability minus the second one, per row (0: a coin toss between two digits)."""
    top2 = np.sort(np.asarray(probs, np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def diverse(images: np.ndarray, order: np.ndarray, n: int, rms: float = SAME_QUESTION_RMS) -> list[int]:
    """The first `n` rows of `order` none of which is within `rms` of one taken before it."""
    flat = np.asarray(images, np.float32).reshape(len(images), -1)
    limit = rms**2 * flat.shape[1]
    taken: list[int] = []
    for i in order:
        if taken:
            d2 = ((flat[taken] - flat[i]) ** 2).sum(axis=1)
            if d2.min() <= limit:
                continue
        taken.append(int(i))
        if len(taken) == n:
            break
    return taken


def rank(batch: shards.Batch, labelled: set[str], n: int) -> list[Question]:
    """The `n` questions worth most among these logged predictions (those not yet labelled)."""
    open_rows = [i for i, r in enumerate(batch.records) if r["prediction_id"] not in labelled]
    if not open_rows or n <= 0:
        return []
    rows = np.array(open_rows)
    rows = rows[has_ink(batch.images[rows])]
    if not len(rows):
        return []
    gap = margins(np.array([batch.records[i]["probabilities"] for i in rows]))
    order = np.argsort(gap, kind="stable")
    chosen = diverse(batch.images[rows], order, n)
    out = []
    for k in chosen:
        r = batch.records[rows[k]]
        out.append(Question(r["prediction_id"], int(r["digit"]), float(r["confidence"]), round(float(gap[k]), 4),
                            str(r["model_version"]), r["time"], batch.images[rows[k]]))
    return out


def queue(log_dir: Path, feedback_dir: Path, n: int) -> list[Question]:
    """GET /feedback/queue's questions: the newest `WINDOW` logged predictions, ranked."""
    batch = prediction_log.read_window(log_dir)
    if len(batch) > WINDOW:
        batch = shards.Batch(batch.records[-WINDOW:], batch.images[-WINDOW:])
    labelled = {r.get("prediction_id") for r in feedback.read_all(feedback_dir).records}
    return rank(batch, labelled, n)
