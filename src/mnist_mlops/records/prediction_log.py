"""The prediction log: every answer the service gave, with the digit exactly as the model saw it.

Written by the service (`PredictionLog`: off the request path, a buffer that a background
thread appends to this worker's own shards every `FLUSH_SECONDS`); read by the feedback
endpoint (`find`), the feedback store and the monitor (`read_window`). The format is
`mnist_mlops.records.shards`: a SIGKILL loses at most the last flush interval and never corrupts what
was written before.

Each record: `prediction_id`, `time` (UTC, ISO 8601), `model_version`, `endpoint`, `digit`,
`confidence`, `probabilities` (10), and the input's summary features
(`mnist_mlops.digit_features`: ink, height, width, centre_y, centre_x, thickness).
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mnist_mlops.digit_features import feature_records
from mnist_mlops.preprocess import to_uint8
from mnist_mlops.records import shards

PREFIX = "predictions"
FLUSH_SECONDS = 0.5
logger = logging.getLogger("mnist_mlops.records.prediction_log")


def new_ids(n: int) -> list[str]:
    """Unique ids that sort by time: 12 hex digits of milliseconds, then 16 random."""
    ms = f"{time.time_ns() // 1_000_000:012x}"
    return [ms + secrets.token_hex(8) for _ in range(n)]


def id_time(prediction_id: str) -> float | None:
    """Seconds since the epoch at which an id was made (None: not one of ours)."""
    if len(prediction_id) != 28 or not all(c in "0123456789abcdef" for c in prediction_id):
        return None
    return int(prediction_id[:12], 16) / 1000


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class PredictionLog:
    """This worker's log writer: `record()` only appends to a list; a thread writes it out."""

    def __init__(self, directory: Path, max_mb: float, flush_seconds: float = FLUSH_SECONDS) -> None:
        max_bytes = int(max_mb * 1024 * 1024)
        self.writer = shards.ShardWriter(directory, PREFIX, shard_bytes=max(64 * 1024, max_bytes // 8),
                                         max_total_bytes=max_bytes)
        self.flush_seconds = flush_seconds
        self._pending: list[tuple[list[dict], tuple[np.ndarray, np.ndarray]]] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # the writer thread and `flush()` callers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def record(self, ids: list[str], endpoint: str, version: str, probs: np.ndarray, x: np.ndarray) -> None:
        """Queue one record per prediction (cheap: the features are computed by the writer)."""
        with self._lock:
            self._pending.append(([{"prediction_id": i, "time": now_iso(), "model_version": version,
                                    "endpoint": endpoint} for i in ids], (probs, x)))

    def flush(self) -> None:
        """Write what is queued (also called by /feedback, to find a prediction made just now)."""
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, []
            self._write(pending)

    def _write(self, pending: list) -> None:
        """All that is queued as one append: two fsyncs a flush, not two a request (a flush of
        256 single-digit requests, benchmarks/records.py: 233 ms that way, 14 now)."""
        if not pending:
            return
        meta = [m for entry, _ in pending for m in entry]
        try:
            probs = np.concatenate([np.asarray(p, np.float32).reshape(-1, 10) for _, (p, _) in pending])
            images = np.concatenate([to_uint8(x) for _, (_, x) in pending])
            digits = probs.argmax(axis=1)
            rounded = np.round(probs.astype(np.float64), 6).tolist()
            for m, d, p, f in zip(meta, digits.tolist(), rounded, feature_records(images), strict=True):
                m.update(digit=d, confidence=p[d], probabilities=p, **f)
            self.writer.append(meta, images)
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop predictions
            logger.warning("prediction log: %d records not written: %s", len(meta), exc)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()


def read_window(directory: Path, start: datetime | None = None, end: datetime | None = None) -> shards.Batch:
    """Every logged prediction with start <= time < end (either bound optional), oldest shard first."""
    def keep(record: dict) -> bool:
        t = parse_time(record["time"])
        return (start is None or t >= start) and (end is None or t < end)

    return shards.read(directory, PREFIX, keep if start or end else None)


# A record reaches its shard at most this long after its id was made (the flush interval, a
# slow disk): a shard started later than that cannot hold the id.
WRITE_DELAY_SECONDS = 60.0
_ID_IN_LINE = re.compile(rb'"prediction_id":"([0-9a-f]{28})"')


def could_hold(stem: Path, t: float) -> bool:
    """Whether a shard may hold an id made at `t`: started before it was written, and written
    to since (its records file's mtime) — so a lookup opens only the shards of that moment."""
    start = shards.started(stem)
    try:
        written = stem.with_suffix(".jsonl").stat().st_mtime
    except FileNotFoundError:
        return False
    return (start is None or start <= t + WRITE_DELAY_SECONDS) and written >= t - 1.0


def find(directory: Path, ids: set[str]) -> dict[str, tuple[dict, np.ndarray]]:
    """The logged records (and digits) of these prediction ids; ids not found are absent.

    The time in each id picks the shards that can hold it; only those are scanned (one regex
    pass over their records), and only shards that do hold one are parsed. An id that is not
    ours, or made in the future, is simply unknown.
    """
    times = {i: t for i in ids if (t := id_time(i)) is not None and t <= time.time() + 1.0}
    if not times:
        return {}
    wanted: set[str] = set()
    stems = []
    for stem in shards.shard_stems(directory, PREFIX):
        candidates = {i for i, t in times.items() if could_hold(stem, t)}
        if not candidates:
            continue
        try:
            text = stem.with_suffix(".jsonl").read_bytes()
        except FileNotFoundError:
            continue
        hits = candidates & {m.decode() for m in _ID_IN_LINE.findall(text)}
        if hits:
            wanted |= hits
            stems.append(stem)
    if not stems:
        return {}
    batch = shards.read(directory, PREFIX, lambda r: r.get("prediction_id") in wanted, stems)
    return {r["prediction_id"]: (r, img) for r, img in zip(batch.records, batch.images, strict=True)}
