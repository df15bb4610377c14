"""Prepare: normalise the raw digits and split them, stratified and seeded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.config import Paths, PrepareParams
from mnist_mlops.training.data import read_data, validate
from mnist_mlops.preprocess import normalize

SPLITS = ("train", "val", "test")


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


def prepare(paths: Paths, params: PrepareParams) -> dict[str, int]:
    """data/ → artifacts/prepared/{split}_x.npy, {split}_y.npy; returns the split sizes."""
    digits = validate(read_data(paths.data))
    x = normalize(digits.images)
    out = paths.prepared
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, idx in stratified_split(digits.labels, params).items():
        np.save(out / f"{name}_x.npy", x[idx], allow_pickle=False)
        np.save(out / f"{name}_y.npy", digits.labels[idx], allow_pickle=False)
        sizes[name] = int(len(idx))
    return sizes


def load_split(prepared: Path, name: str) -> Split:
    try:
        return Split(np.load(prepared / f"{name}_x.npy"), np.load(prepared / f"{name}_y.npy"))
    except FileNotFoundError:
        from mnist_mlops.errors import UserError

        raise UserError(f"no prepared '{name}' split in {prepared}: run `dvc repro prepare`") from None
