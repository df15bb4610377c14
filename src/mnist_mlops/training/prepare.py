"""Prepare: normalise the raw digits and split them, stratified and seeded.

The base source's digits are split exactly as they always were, so the base test split the
gate compares champion and challenger on never changes when feedback arrives. Labelled
feedback digits (the rows after `base` in data/feedback.json) go to train, val or the
*feedback slice* by a hash of their pixels: a digit stays on its side in every data version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.config import Params, Paths, PrepareParams
from mnist_mlops.errors import UserError
from mnist_mlops.preprocess import normalize
from mnist_mlops.training.data import Digits, feedback_meta, read_data, validate

FEEDBACK_SPLIT = "feedback"  # the held-out feedback slice: prepared/feedback_{x,y}.npy
FEEDBACK_INFO = "feedback.json"  # prepared/feedback.json: counts per side, newest label time


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 N×28×28×1 in [0, 1]
    y: np.ndarray  # uint8 N


def stratified_split(labels: np.ndarray, params: PrepareParams) -> dict[str, np.ndarray]:
    """Indices of train/val/test with every digit in the same proportion in each."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=params.test_fraction, stratify=labels,
                                  random_state=params.seed)
    train, val = train_test_split(rest, test_size=params.val_fraction, stratify=labels[rest],
                                  random_state=params.seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _raw(paths: Paths, params: Params) -> tuple[Digits, int]:
    """data/ validated, and how many of its rows are the base source's (the rest are feedback)."""
    digits = validate(read_data(paths.data), params.data.max_class_imbalance)
    meta = feedback_meta(paths.data)
    return digits, (int(meta["base"]) if meta else len(digits.labels))


def feedback_sides(images: np.ndarray, slice_fraction: float, val_fraction: float) -> np.ndarray:
    """'slice', 'val' or 'train' per feedback digit, from a hash of its pixels (stable across versions)."""
    u = np.array([int(hashlib.sha256(img.tobytes()).hexdigest()[:8], 16) / 2**32 for img in images])
    return np.where(u < slice_fraction, "slice",
                    np.where(u < slice_fraction + (1 - slice_fraction) * val_fraction, "val", "train"))


def split_indices(digits: Digits, base: int, params: PrepareParams) -> dict[str, np.ndarray]:
    """Rows of each split: the base rows split as always, feedback rows by their pixel hash."""
    splits = stratified_split(digits.labels[:base], params)
    sides = feedback_sides(digits.images[base:], params.feedback_slice_fraction, params.val_fraction)
    extra = {side: base + np.flatnonzero(sides == side) for side in ("train", "val", "slice")}
    return {"train": np.concatenate([splits["train"], extra["train"]]),
            "val": np.concatenate([splits["val"], extra["val"]]),
            "test": splits["test"], FEEDBACK_SPLIT: extra["slice"]}


def prepare(paths: Paths, params: Params) -> dict[str, int]:
    """data/ → artifacts/prepared/{split}_x.npy, {split}_y.npy; returns the split sizes."""
    digits, base = _raw(paths, params)
    x = normalize(digits.images)
    out = paths.prepared
    out.mkdir(parents=True, exist_ok=True)
    splits = split_indices(digits, base, params.prepare)
    sizes = {}
    for name, idx in splits.items():
        np.save(out / f"{name}_x.npy", x[idx], allow_pickle=False)
        np.save(out / f"{name}_y.npy", digits.labels[idx], allow_pickle=False)
        sizes[name] = int(len(idx))
    meta = feedback_meta(paths.data) or {}
    info = {"digits": len(digits.labels) - base, "newest": meta.get("newest"),
            **{f"in_{name}": int(np.sum(splits[name] >= base)) for name in ("train", "val", FEEDBACK_SPLIT)}}
    (out / FEEDBACK_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return sizes


def stage(params: Params, paths: Paths) -> str:
    """The DVC `prepare` stage."""
    sizes = prepare(paths, params)
    return (f"prepare: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test digits, "
            f"{sizes[FEEDBACK_SPLIT]} in the feedback slice")


def load_split(prepared: Path, name: str) -> Split:
    try:
        return Split(np.load(prepared / f"{name}_x.npy"), np.load(prepared / f"{name}_y.npy"))
    except FileNotFoundError:
        raise UserError(f"no prepared '{name}' split in {prepared}: run `dvc repro prepare`") from None


def _rebuilt(paths: Paths, params: Params, name: str) -> Split:
    """One split, prepared, else rebuilt from data/: the split is a pure function of data/ and
    the `prepare` params, so a fresh clone without artifacts/ gets exactly what `prepare` would."""
    if (paths.prepared / f"{name}_x.npy").exists():
        return load_split(paths.prepared, name)
    digits, base = _raw(paths, params)
    idx = split_indices(digits, base, params.prepare)[name]
    return Split(normalize(digits.images[idx]), digits.labels[idx])


def test_split(paths: Paths, params: Params) -> Split:
    """The base test split the gate scores on (never holds feedback digits)."""
    return _rebuilt(paths, params, "test")


def feedback_slice(paths: Paths, params: Params) -> Split:
    """The held-out feedback digits the gate also scores on (empty without feedback)."""
    return _rebuilt(paths, params, FEEDBACK_SPLIT)


test_split.__test__ = False  # a library function, not a pytest test
