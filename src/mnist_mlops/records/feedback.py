"""The feedback store: labelled digits from people, the one way corrections reach training.

Written by the service's `/feedback` endpoint and by `mnist-mlops feedback import`; read by
the training flow's fetch step (`accepted`), `mnist-mlops feedback` and the monitor. Stored as
append-only shards (`mnist_mlops.records.shards`), the digit copied in, so a label outlives the
prediction log's retention.

Each record: `time` (UTC), `label`, `source` (feedback | import), `sha` (of the 784 pixels:
the same digit labelled twice is one example, the newest label wins), and where it came from:
`prediction_id`, `predicted`, `model_version` (feedback) or `file` (import).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.digit_features import has_ink
from mnist_mlops.records import shards
from mnist_mlops.records.prediction_log import now_iso, parse_time
from mnist_mlops.records.verdicts import ACCEPTED, QUARANTINED, REJECTED

PREFIX = "labels"
SHARD_BYTES = 4 * 1024 * 1024  # ~5,000 digits per shard
# A labelled digit this close to a base test digit (RMS pixel difference, of 255) is a copy of
# it: re-encoded or lightly noised. The closest two distinct digits of the sample are 12.2
# apart, a copy sent through the service as integers is 0 apart.
NEAR_COPY_RMS = 8.0


def digit_sha(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()[:32]


@dataclass(frozen=True)
class Examples:
    """Labelled digits, one per distinct digit (newest label), oldest first."""

    images: np.ndarray  # uint8 N×28×28
    labels: np.ndarray  # uint8 N
    records: list[dict]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: slice) -> Examples:
        return Examples(self.images[rows], self.labels[rows], self.records[rows])

    @classmethod
    def empty(cls) -> Examples:
        return cls(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), [])

    @property
    def newest(self) -> str | None:
        return max((r["time"] for r in self.records), default=None)


class FeedbackStore:
    """Appends labelled digits for one process (thread-safe); each process has its own shards."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._writer = shards.ShardWriter(self.directory, PREFIX, SHARD_BYTES)
        self._lock = threading.Lock()

    def add(self, records: list[dict], images: np.ndarray) -> None:
        """Store labelled digits: each record needs `label` and `source`; time and sha are added."""
        images = np.asarray(images, np.uint8).reshape(-1, 28, 28)
        t = now_iso()
        full = [{"time": t, **r, "label": int(r["label"]), "sha": digit_sha(img)}
                for r, img in zip(records, images, strict=True)]
        with self._lock:
            self._writer.append(full, images)


def read_all(directory: Path) -> shards.Batch:
    return shards.read(directory, PREFIX)


def accepted(directory: Path, until: str | None = None) -> Examples:
    """The labelled examples as training sees them: one per digit, its newest label (up to `until`)."""
    batch = read_all(directory)
    cutoff = parse_time(until) if until else None
    latest: dict[str, int] = {}
    order = sorted(range(len(batch)), key=lambda i: (batch.records[i]["time"], i))
    for i in order:
        if cutoff is None or parse_time(batch.records[i]["time"]) <= cutoff:
            latest[batch.records[i]["sha"]] = i
    chosen = sorted(latest.values(), key=lambda i: (batch.records[i]["time"], i))
    if not chosen:
        return Examples.empty()
    return Examples(batch.images[chosen], np.array([batch.records[i]["label"] for i in chosen], np.uint8),
                    [batch.records[i] for i in chosen])


def select(examples: Examples, keep: np.ndarray) -> Examples:
    keep = np.asarray(keep, bool)
    return Examples(examples.images[keep], examples.labels[keep],
                    [r for r, k in zip(examples.records, keep, strict=True) if k])


@dataclass(frozen=True)
class Screened:
    """What training may learn from, and how many labelled digits were held back and why."""

    examples: Examples
    leaks_blocked: int = 0  # copies of base test digits: the gate scores on those, nothing may train on them
    blank: int = 0  # no ink: no digit to learn
    capped: int = 0  # over data.max_class_imbalance: the newest labels of an over-full class wait
    quarantined: int = 0  # likely label errors (training/screening.py): they wait for `feedback review`
    rejected: int = 0  # a person rejected them in `feedback review`
    pending: int = 0  # not screened yet: no champion to screen them with

    def held_back(self) -> dict[str, int]:
        """The counts of what was kept out of the data, by `HELD_BACK` key."""
        return {key: getattr(self, key) for key in HELD_BACK}


# The summary's words for each count of `Screened`.
HELD_BACK = {"leaks_blocked": "test-digit copies", "blank": "blank", "capped": "over the class limit",
             "quarantined": "quarantined as likely label errors (mnist-mlops feedback review)",
             "rejected": "rejected in review", "pending": "waiting for a champion to screen them"}


def held_back(screened: dict[str, int]) -> str | None:
    """`30 test-digit copies, 2 blank`: the labels the fetch step kept out of the data (None: none)."""
    parts = [f"{screened[key]} {what}" for key, what in HELD_BACK.items() if screened.get(key)]
    return ", ".join(parts) or None


def copies_of(images: np.ndarray, test_images: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Per labelled digit: whether it is a (near) copy of one of the base test digits."""
    if not len(images) or not len(test_images):
        return np.zeros(len(images), bool)
    exact = {img.tobytes() for img in np.asarray(test_images, np.uint8)}
    out = np.array([img.tobytes() in exact for img in images])
    t = np.asarray(test_images, np.float32).reshape(len(test_images), -1)
    t_sq = (t * t).sum(axis=1)
    limit = NEAR_COPY_RMS**2 * t.shape[1]
    for start in range(0, len(images), chunk):
        a = np.asarray(images[start:start + chunk], np.float32).reshape(-1, t.shape[1])
        d2 = (a * a).sum(axis=1)[:, None] + t_sq[None, :] - 2.0 * (a @ t.T)
        out[start:start + len(a)] |= d2.min(axis=1) <= limit
    return out


def within_balance(labels: np.ndarray, base_labels: np.ndarray, max_imbalance: float) -> np.ndarray:
    """Keep, per class, the oldest labels that fit: base + feedback stays within `max_imbalance`.

    Feedback only adds, so the smallest class of the whole never shrinks; a class may hold at
    most `max_imbalance` × that many digits. The class that sets the minimum is never capped,
    so one pass is enough.
    """
    base = np.bincount(np.asarray(base_labels, np.int64), minlength=10)
    wanted = np.bincount(np.asarray(labels, np.int64), minlength=10)
    room = np.maximum(0, np.floor(max_imbalance * (base + wanted).min()).astype(np.int64) - base)
    keep = np.zeros(len(labels), bool)
    taken = np.zeros(10, np.int64)
    for i, label in enumerate(np.asarray(labels, np.int64)):  # oldest first
        if taken[label] < room[label]:
            keep[i], taken[label] = True, taken[label] + 1
    return keep


# Judges the labels of usable digits: a verdict per example (accepted | quarantined | rejected | pending).
Judge = Callable[[Examples], np.ndarray]


def screen(examples: Examples, base_labels: np.ndarray, test_images: np.ndarray,
           max_imbalance: float, judge: Judge | None = None) -> Screened:
    """The labelled digits training may use: no blank digit, no copy of a base test digit, no
    label the `judge` holds back, and no more of a class than keeps the data within
    `data.max_class_imbalance`.

    The fetch step and the monitor both call this, so "new labels" means the same to both.
    """
    inked = has_ink(examples.images) if len(examples) else np.zeros(0, bool)
    leaks = copies_of(examples.images, test_images) & inked
    usable = select(examples, inked & ~leaks)
    verdict = judge(usable) if judge is not None and len(usable) else np.full(len(usable), ACCEPTED, object)
    judged = select(usable, verdict == ACCEPTED)
    balanced = within_balance(judged.labels, base_labels, max_imbalance)
    held = {v: int((verdict == v).sum()) for v in (QUARANTINED, REJECTED, "pending")}
    return Screened(select(judged, balanced), leaks_blocked=int(leaks.sum()), blank=int((~inked).sum()),
                    capped=int((~balanced).sum()), **held)


def newer_than(examples: Examples, since: str | None) -> int:
    """How many examples were labelled after `since` (all of them when None)."""
    if since is None:
        return len(examples)
    t = parse_time(since)
    return sum(parse_time(r["time"]) > t for r in examples.records)


def counts(directory: Path, since: str | None) -> dict:
    """What `mnist-mlops feedback` prints: totals, new since a data version, per label, disagreement."""
    examples = accepted(directory)
    from_predictions = [r for r in examples.records if r.get("predicted") is not None]
    disagreed = sum(r["predicted"] != r["label"] for r in from_predictions)
    return {
        "total": len(examples),
        "new": newer_than(examples, since),
        "per_label": {d: int((examples.labels == d).sum()) for d in range(10)},
        "from_predictions": len(from_predictions),
        "disagreed": disagreed,
        "disagreed_share": disagreed / len(from_predictions) if from_predictions else None,
        "newest": examples.newest,
    }


def export(directory: Path, path: Path) -> int:
    """Write the accepted examples as an .npz (`x`, `y`, Keras-style uint8); returns the count."""
    examples = accepted(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, x=examples.images, y=examples.labels)
    tmp.replace(path)
    return len(examples)
