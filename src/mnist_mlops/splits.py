"""Which rows of data/ are train, val, test or the feedback slice: one pure function of the
data and the `prepare` params, shared by the prepare stage, the fetch step (no labelled copy of
a base test digit may reach train or val) and the monitor (which counts what a retrain would add).

The base source's rows are split stratified and seeded, exactly as they always were, so the
base test split never moves when feedback arrives. Labelled feedback rows (after `base`) go to
train, val or the feedback slice by a hash of their pixels: a digit stays on its side in every
data version.
"""

from __future__ import annotations

import hashlib

import numpy as np

from mnist_mlops.config import PrepareParams

FEEDBACK_SPLIT = "feedback"  # the held-out feedback slice: prepared/feedback_{x,y}.npy


def stratified_split(labels: np.ndarray, params: PrepareParams) -> dict[str, np.ndarray]:
    """Indices of train/val/test with every digit in the same proportion in each."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=params.test_fraction, stratify=labels,
                                  random_state=params.seed)
    train, val = train_test_split(rest, test_size=params.val_fraction, stratify=labels[rest],
                                  random_state=params.seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def feedback_sides(images: np.ndarray, slice_fraction: float, val_fraction: float) -> np.ndarray:
    """'slice', 'val' or 'train' per feedback digit, from a hash of its pixels (stable across versions)."""
    u = np.array([int(hashlib.sha256(img.tobytes()).hexdigest()[:8], 16) / 2**32 for img in images])
    return np.where(u < slice_fraction, "slice",
                    np.where(u < slice_fraction + (1 - slice_fraction) * val_fraction, "val", "train"))


def split_indices(images: np.ndarray, labels: np.ndarray, base: int, params: PrepareParams) -> dict[str, np.ndarray]:
    """Rows of each split: the base rows split as always, feedback rows by their pixel hash."""
    splits = stratified_split(labels[:base], params)
    sides = feedback_sides(images[base:], params.feedback_slice_fraction, params.val_fraction)
    extra = {side: base + np.flatnonzero(sides == side) for side in ("train", "val", "slice")}
    return {"train": np.concatenate([splits["train"], extra["train"]]),
            "val": np.concatenate([splits["val"], extra["val"]]),
            "test": splits["test"], FEEDBACK_SPLIT: extra["slice"]}


def base_test_images(images: np.ndarray, labels: np.ndarray, params: PrepareParams) -> np.ndarray:
    """The base source's test digits (uint8), given the base rows alone."""
    return images[stratified_split(labels, params)["test"]]
