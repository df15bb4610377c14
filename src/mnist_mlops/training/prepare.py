"""Prepare: normalise the raw digits and split them, stratified and seeded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.config import Params, Paths, PrepareParams
from mnist_mlops.errors import UserError
from mnist_mlops.preprocess import normalize
from mnist_mlops.training.data import Digits, read_data, validate


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


def _raw(paths: Paths, params: Params) -> Digits:
    return validate(read_data(paths.data), params.data.max_class_imbalance)


def prepare(paths: Paths, params: Params) -> dict[str, int]:
    """data/ → artifacts/prepared/{split}_x.npy, {split}_y.npy; returns the split sizes."""
    digits = _raw(paths, params)
    x = normalize(digits.images)
    out = paths.prepared
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, idx in stratified_split(digits.labels, params.prepare).items():
        np.save(out / f"{name}_x.npy", x[idx], allow_pickle=False)
        np.save(out / f"{name}_y.npy", digits.labels[idx], allow_pickle=False)
        sizes[name] = int(len(idx))
    return sizes


def stage(params: Params, paths: Paths) -> str:
    """The DVC `prepare` stage."""
    sizes = prepare(paths, params)
    return f"prepare: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test digits"


def load_split(prepared: Path, name: str) -> Split:
    try:
        return Split(np.load(prepared / f"{name}_x.npy"), np.load(prepared / f"{name}_y.npy"))
    except FileNotFoundError:
        raise UserError(f"no prepared '{name}' split in {prepared}: run `dvc repro prepare`") from None


def test_split(paths: Paths, params: Params) -> Split:
    """The base test split the gate scores on: the prepared one, else rebuilt from data/.

    The split is a pure function of data/ and the `prepare` params, so rebuilding it (a fresh
    clone with data/ pulled but no artifacts/) gives exactly the digits `prepare` would.
    """
    if (paths.prepared / "test_x.npy").exists():
        return load_split(paths.prepared, "test")
    digits = _raw(paths, params)
    idx = stratified_split(digits.labels, params.prepare)["test"]
    return Split(normalize(digits.images[idx]), digits.labels[idx])


test_split.__test__ = False  # a library function, not a pytest test
