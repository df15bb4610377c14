"""`mnist-mlops feedback review`: the quarantined labels, and a person's release or rejection.

Review first screens the labels not screened yet, with the fetch step's own code
(`fetch.screened_labels`), so what it lists is what the next run would hold back. A release
(`--accept`) makes the label data at the next run; a rejection keeps it out for good (the digit
labelled again with another label is screened afresh).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.config import Params, Paths
from mnist_mlops.errors import UserError
from mnist_mlops.records import feedback, verdicts


@dataclass(frozen=True)
class Suspect:
    """A quarantined label: `id` is its prediction id, or its digit's sha for an imported file."""

    id: str
    sha: str
    label: int
    predicted: int | None
    score: float | None
    time: str
    origin: str  # the prediction id or the imported file
    image: np.ndarray

    def for_json(self) -> dict:
        return {"id": self.id, "label": self.label, "predicted": self.predicted, "score": self.score,
                "time": self.time, "origin": self.origin, "pixels": self.image.tolist()}


def screen_pending(paths: Paths, params: Params) -> None:
    """Screen every label not screened yet, as the next run's fetch step would."""
    from mnist_mlops.training.data import DataError
    from mnist_mlops.training.fetch import base_of, screened_labels

    try:
        base, _ = base_of(paths.data)
    except DataError:
        raise UserError(f"no data in {paths.data} to screen labels against: run `mnist-mlops run` first") from None
    screened_labels(base, paths.feedback, params)


def suspects(feedback_dir: Path) -> list[Suspect]:
    """The labels waiting in quarantine, oldest first (the newest label of each digit only)."""
    examples = feedback.accepted(feedback_dir)
    found = verdicts.read(feedback_dir)
    out = []
    for record, image in zip(examples.records, examples.images, strict=True):
        v = found.get(verdicts.key(record))
        if v is None or v["verdict"] != verdicts.QUARANTINED:
            continue
        origin = record.get("prediction_id") or record.get("file") or ""
        out.append(Suspect(record.get("prediction_id") or record["sha"], record["sha"], int(record["label"]),
                           v.get("predicted"), v.get("score"), record["time"], origin, image))
    return out


def decide(feedback_dir: Path, ids: list[str], verdict: str) -> list[Suspect]:
    """Release (`accepted`) or reject quarantined labels by id (a prediction id, or a digit sha
    or its first 8+ characters); any id that names no quarantined label changes nothing."""
    waiting = suspects(feedback_dir)
    chosen = []
    for wanted in ids:
        hits = [s for s in waiting if wanted in (s.id, s.sha) or (len(wanted) >= 8 and s.sha.startswith(wanted))]
        if len(hits) != 1:
            why = "names no quarantined label" if not hits else f"names {len(hits)} quarantined labels"
            raise UserError(f"{wanted!r} {why}: `mnist-mlops feedback review` lists them; nothing was changed")
        chosen.append(hits[0])
    verdicts.append(feedback_dir, [{"sha": s.sha, "label": s.label, "verdict": verdict, "by": "review"}
                                   for s in chosen])
    return chosen
