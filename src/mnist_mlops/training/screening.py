"""Label screening: likely label errors among new labels, found by cleanlab and quarantined.

Every label people send becomes training data at the next run, so a wrong one (a slip, or
someone labelling every 3 as 8) teaches the model a mistake. Before a label becomes data, the
fetch step (and `mnist-mlops feedback review`) scores its digit and asks cleanlab's
confident learning (`cleanlab.filter.find_label_issues`) whether the label is likely wrong.
Suspects are quarantined: kept in the store, not trained on, until a person releases or
rejects them. Each verdict is kept (`mnist_mlops.records.verdicts`), so a label is judged once.

Why the champion's probabilities, beside the base validation split: confident learning needs
out-of-sample probabilities (a model that trained on a digit agrees with its label). No label
reaches training before it is screened, and the validation digits were never trained on, so
the champion has seen neither. The validation digits' labels are right: they set cleanlab's
per-class thresholds, so a few new labels, or a flood of systematically wrong ones, are judged
against what each class looks like, not against each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.config import Params
from mnist_mlops.records import verdicts
from mnist_mlops.records.feedback import Examples, select
from mnist_mlops.splits import stratified_split

PENDING = "pending"  # not screened yet: no champion to screen with


@dataclass(frozen=True)
class Reference:
    """Digits whose labels are right and that the champion never trained on: the base validation split."""

    images: np.ndarray  # uint8 N×28×28
    labels: np.ndarray

    @classmethod
    def from_base(cls, images: np.ndarray, labels: np.ndarray, params: Params) -> Reference:
        rows = stratified_split(labels, params.prepare)["val"]
        return cls(images[rows], labels[rows])


def judge(examples: Examples, reference: Reference, feedback_dir: Path, params: Params) -> np.ndarray:
    """Each example's verdict (accepted | quarantined | rejected | pending), screening the ones
    not judged yet (and recording their verdicts). Labels from `data.trusted_sources` are
    accepted unscreened; with `data.screen_labels` off, every label not rejected is accepted."""
    found = verdicts.read(feedback_dir)
    todo = [i for i, r in enumerate(examples.records) if verdicts.key(r) not in found]
    trusted = [i for i in todo if examples.records[i].get("source") in params.data.trusted_sources]
    if params.data.screen_labels:
        untrusted = np.zeros(len(examples), bool)
        untrusted[todo] = True
        untrusted[trusted] = False
        screened = screen(select(examples, untrusted), reference)
    else:
        trusted, screened = todo, []
    by = "trusted" if params.data.screen_labels else "unscreened"
    new = [{"sha": examples.records[i]["sha"], "label": int(examples.labels[i]), "verdict": verdicts.ACCEPTED,
            "by": by} for i in trusted] + screened
    verdicts.append(feedback_dir, new)
    return verdicts_in(examples, found | {verdicts.key(r): r for r in new})


def known(examples: Examples, feedback_dir: Path) -> np.ndarray:
    """Each example's recorded verdict, `pending` where none is recorded (nothing is screened)."""
    return verdicts_in(examples, verdicts.read(feedback_dir))


def verdicts_in(examples: Examples, found: dict) -> np.ndarray:
    return np.array([found.get(verdicts.key(r), {}).get("verdict", PENDING) for r in examples.records], dtype=object)


def screen(examples: Examples, reference: Reference) -> list[dict]:
    """Verdicts for these labels from the champion's probabilities (none without a champion)."""
    from mnist_mlops import registry

    champion = registry.champion_version() if len(examples) else None
    if champion is None:
        return []
    probs = registry.probabilities_of(champion, np.concatenate([reference.images, examples.images]))
    flagged, quality = label_issues(np.concatenate([reference.labels, examples.labels]), probs)
    n = len(reference.labels)
    return [{"sha": r["sha"], "label": int(label), "verdict": verdicts.QUARANTINED if bad else verdicts.ACCEPTED,
             "by": "screen", "predicted": int(p.argmax()), "score": round(float(q), 4), "model_version": champion}
            for r, label, bad, q, p in zip(examples.records, examples.labels, flagged[n:], quality[n:], probs[n:],
                                           strict=True)]


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's confident learning: (likely label error per row, label quality 0–1 per row)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows sum to 1 ± 1e-7; cleanlab checks
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate")
    return np.asarray(flagged, bool), get_label_quality_scores(labels, probs, method="self_confidence")
