"""The feedback store: labelled digits from people, the one way corrections reach training.

Written by the service's `/feedback` endpoint and by `mnist-mlops feedback import`; read by
the training flow's fetch step (`accepted`), `mnist-mlops feedback` and the monitor. Stored as
append-only shards (`mnist_mlops.shards`), the digit copied in, so a label outlives the
prediction log's retention.

Each record: `time` (UTC), `label`, `source` (feedback | import), `sha` (of the 784 pixels:
the same digit labelled twice is one example, the newest label wins), and where it came from:
`prediction_id`, `predicted`, `model_version` (feedback) or `file` (import).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops import shards
from mnist_mlops.prediction_log import now_iso, parse_time

PREFIX = "labels"
DIR_ENV = "MNIST_MLOPS_FEEDBACK"  # where the service stores labels (`mnist-mlops serve` sets it)
SHARD_BYTES = 4 * 1024 * 1024  # ~5,000 digits per shard


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
