"""The flow's fetch step: the base source plus the feedback store's labelled digits → data/.

Not a DVC stage (data/ is `dvc add`-ed, then pinned by data.dvc), so the stages never depend
on the feedback store's code; they read data/ and data/feedback.json only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mnist_mlops import feedback
from mnist_mlops.config import DataParams, Paths
from mnist_mlops.training.data import Digits, FetchResult, feedback_meta
from mnist_mlops.training.data import fetch as fetch_data


def with_feedback(base: Digits, data_dir: Path, feedback_dir: Path, min_new: int) -> tuple[Digits, dict | None, int]:
    """Base digits + the labelled digits; returns (digits, data/feedback.json contents, kept for later).

    Fewer than `min_new` digits labelled since the current data version are kept for later:
    data/ keeps the examples it had (labels as they were then), so data.dvc stays put and a
    scheduled run trains nothing.
    """
    previous = feedback_meta(data_dir)
    since = previous["newest"] if previous else None
    examples = feedback.accepted(feedback_dir)
    new = feedback.newer_than(examples, since)
    kept = 0
    if new < min_new:
        kept = new
        examples = feedback.accepted(feedback_dir, until=since) if since else feedback.Examples.empty()
    if not len(examples):
        return base, None, kept
    digits = Digits(np.concatenate([base.images, examples.images]), np.concatenate([base.labels, examples.labels]))
    return digits, {"base": len(base.labels), "count": len(examples), "newest": examples.newest}, kept


def fetch(params: DataParams, paths: Paths) -> FetchResult:
    """data/ from the configured source, plus the labelled digits when `data.feedback` is on."""
    if not params.feedback:
        return fetch_data(params, paths.data, paths.cache)
    return fetch_data(params, paths.data, paths.cache,
                      lambda base, data_dir: with_feedback(base, data_dir, paths.feedback, params.feedback_min_new))
