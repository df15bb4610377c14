"""Prepare: normalise the raw digits and split them (mnist_mlops.splits), stratified and seeded.

The base source's digits are split exactly as they always were, so the base test split the
gate compares champion and challenger on never changes when feedback arrives. Labelled
feedback digits (the rows after `base` in data/feedback.json) go to train, val or the
*feedback slice* by a hash of their pixels: a digit stays on its side in every data version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.config import Params, Paths
from mnist_mlops.errors import UserError
from mnist_mlops.preprocess import normalize
from mnist_mlops.splits import FEEDBACK_SPLIT, split_indices
from mnist_mlops.training.data import Digits, feedback_meta, read_data, validate

FEEDBACK_INFO = "feedback.json"  # prepared/feedback.json: counts per side, newest label time


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 N×28×28×1 in [0, 1]
    y: np.ndarray  # uint8 N


def _raw(paths: Paths, params: Params) -> tuple[Digits, int]:
    """data/ validated, and how many of its rows are the base source's (the rest are feedback)."""
    digits = validate(read_data(paths.data), params.data.max_class_imbalance)
    meta = feedback_meta(paths.data)
    return digits, (int(meta["base"]) if meta else len(digits.labels))


def prepare(paths: Paths, params: Params) -> dict[str, int]:
    """data/ → artifacts/prepared/{split}_x.npy, {split}_y.npy; returns the split sizes."""
    digits, base = _raw(paths, params)
    x = normalize(digits.images)
    out = paths.prepared
    out.mkdir(parents=True, exist_ok=True)
    splits = split_indices(digits.images, digits.labels, base, params.prepare)
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
    idx = split_indices(digits.images, digits.labels, base, params.prepare)[name]
    return Split(normalize(digits.images[idx]), digits.labels[idx])


def test_split(paths: Paths, params: Params) -> Split:
    """The base test split the gate scores on (never holds feedback digits)."""
    return _rebuilt(paths, params, "test")


def feedback_slice(paths: Paths, params: Params) -> Split:
    """The held-out feedback digits the gate also scores on (empty without feedback)."""
    return _rebuilt(paths, params, FEEDBACK_SPLIT)


test_split.__test__ = False  # a library function, not a pytest test
