"""Label verdicts: whether a labelled digit may become training data, decided once and kept.

The fetch step screens every new label (`mnist_mlops.training.screening`) and
`mnist-mlops feedback review` releases or rejects what it held back; both append here, to
`verdicts.jsonl` in the feedback store. A verdict belongs to a digit *and* its label (`sha`,
`label`): the same digit labelled again with another label is screened again, and the newest
verdict of a pair wins (a person's review overrides the screen).

Each record: `sha`, `label`, `verdict` (accepted | quarantined | rejected), `by` (screen |
trusted | review), `time`, and from the screen `predicted`, `score` (cleanlab's label quality:
the model's probability of the given label, 0–1), `model_version`.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from mnist_mlops.records.prediction_log import now_iso

FILE = "verdicts.jsonl"
ACCEPTED, QUARANTINED, REJECTED = "accepted", "quarantined", "rejected"
VERDICTS = (ACCEPTED, QUARANTINED, REJECTED)

Key = tuple[str, int]  # (digit sha, label)


def key(record: dict) -> Key:
    return record["sha"], int(record["label"])


def read(directory: Path) -> dict[Key, dict]:
    """The newest verdict of each (digit, label); a torn last line (a crash mid-append) is ignored."""
    try:
        lines = (Path(directory) / FILE).read_text().splitlines()
    except FileNotFoundError:
        return {}
    newest: dict[Key, dict] = {}
    for line in lines:
        try:
            record = json.loads(line)
            newest[key(record)] = record
        except (ValueError, KeyError, TypeError):
            continue
    return newest


def append(directory: Path, records: list[dict]) -> None:
    """Add verdicts (each with `sha`, `label`, `verdict`, `by`; time is added) in one locked,
    fsynced write: the fetch step and a review in another terminal never interleave lines."""
    if not records:
        return
    for r in records:
        if r["verdict"] not in VERDICTS:
            raise ValueError(f"unknown verdict {r['verdict']!r}")
    t = now_iso()
    data = "".join(json.dumps({"time": t, **r, "label": int(r["label"])}) + "\n" for r in records).encode()
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(directory) / FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
