"""The flow's fetch step: the base source plus the feedback store's labelled digits → data/.

Not a DVC stage (data/ is `dvc add`-ed, then pinned by data.dvc), so the stages never depend
on the feedback store's code; they read data/ and data/feedback.json only.

Labels are screened before they become data (`feedback.screen`): a blank digit, a copy of a
base test digit (people try the service with MNIST's own test digits; the gate scores on
those), a likely label error (`training.screening`: quarantined for `feedback review`), or
more of a class than `data.max_class_imbalance` allows never reaches data/, so labels can
neither leak the test split into training, teach it a mistake, nor make the pipeline unrunnable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_mlops.config import Params, Paths
from mnist_mlops.records import feedback, verdicts
from mnist_mlops.splits import base_test_images
from mnist_mlops.training import screening
from mnist_mlops.training.data import Digits, FetchResult, feedback_meta, read_data
from mnist_mlops.training.data import fetch as fetch_data


def screened_labels(base: Digits, feedback_dir: Path, params: Params, until: str | None = None,
                    judge: bool = True) -> feedback.Screened:
    """The store's labelled digits (up to `until`) that training may use, with what was held back.

    `judge`: screen the labels not judged yet (`training.screening`, with the champion). The
    monitor passes False: it only counts, and a label not screened yet counts as usable.
    """
    examples = feedback.accepted(feedback_dir, until=until)

    def verdicts_of(usable: feedback.Examples):
        if judge:
            reference = screening.Reference.from_base(base.images, base.labels, params)
            return screening.judge(usable, reference, feedback_dir, params)
        found = screening.known(usable, feedback_dir)
        return np.where(found == screening.PENDING, verdicts.ACCEPTED, found)

    return feedback.screen(examples, base.labels, base_test_images(base.images, base.labels, params.prepare),
                           params.data.max_class_imbalance, verdicts_of)


def base_of(data_dir: Path) -> tuple[Digits, dict | None]:
    """The base source's digits as data/ holds them (the rows before the labelled ones), and
    data/feedback.json; DataError when data/ has no readable data version."""
    data, meta = read_data(data_dir), feedback_meta(data_dir)
    base = int(meta["base"]) if meta else len(data.labels)
    return Digits(data.images[:base], data.labels[:base]), meta


def with_feedback(base: Digits, data_dir: Path, feedback_dir: Path,
                  params: Params) -> tuple[Digits, dict | None, int, feedback.Screened]:
    """Base digits + the screened labelled digits; returns (digits, data/feedback.json contents,
    new digits kept for later, the screening).

    Fewer than `data.feedback_min_new` usable digits labelled since the current data version
    are kept for later: data/ keeps the examples it had (labels as they were then), so data.dvc
    stays put and a scheduled run trains nothing.
    """
    previous = feedback_meta(data_dir)
    since = previous["newest"] if previous else None
    screened = screened_labels(base, feedback_dir, params)
    kept = feedback.newer_than(screened.examples, since)
    if kept >= params.data.feedback_min_new:
        kept, chosen = 0, screened
    else:  # the labels of the current data version, as the store and the reviews judge them now
        chosen = screened_labels(base, feedback_dir, params, until=since) if since else None
    if chosen is None or not len(chosen.examples):
        return base, None, kept, screened
    examples = chosen.examples
    digits = Digits(np.concatenate([base.images, examples.images]), np.concatenate([base.labels, examples.labels]))
    meta = {"base": len(base.labels), "count": len(examples), "newest": examples.newest,
            "quarantined": chosen.quarantined + chosen.rejected, "labels": [label_entry(r) for r in examples.records]}
    return digits, meta, kept, screened


def label_entry(record: dict) -> dict:
    """A labelled digit as its data version lists it, in row order after the base digits: what
    `mnist-mlops trace` matches a prediction's label against (the training run logs the list)."""
    origin = {k: record[k] for k in ("prediction_id", "file") if record.get(k)}
    return {"sha": record["sha"], "label": int(record["label"]), "time": record["time"], **origin}


def fetch(params: Params, paths: Paths) -> FetchResult:
    """data/ from the configured source, plus the screened labelled digits when `data.feedback` is on."""
    if not params.data.feedback:
        return fetch_data(params.data, paths.data, paths.cache)
    return fetch_data(params.data, paths.data, paths.cache,
                      lambda base, data_dir: with_feedback(base, data_dir, paths.feedback, params))
