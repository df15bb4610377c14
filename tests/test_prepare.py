"""Prepare: the split, the class-balance limit it shares with fetch, the test split rebuilt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_mlops.config import Paths, validate
from mnist_mlops.errors import UserError
from mnist_mlops.training.data import Digits, load_sample, write_data
from mnist_mlops.training.prepare import load_split, prepare, test_split


def unbalanced(ratio: int) -> Digits:
    """The sample with digit 0 kept whole and the other digits cut to 1/ratio of it."""
    d = load_sample()
    keep = np.concatenate([np.flatnonzero(d.labels == k)[: (500 if k == 0 else 500 // ratio)] for k in range(10)])
    return Digits(d.images[keep], d.labels[keep])


def test_prepare_uses_the_class_imbalance_param(tmp_path: Path) -> None:
    """A 4:1 dataset passes fetch with data.max_class_imbalance=5, and so must prepare."""
    write_data(unbalanced(4), tmp_path / "data")
    paths = Paths(tmp_path)
    sizes = prepare(paths, validate({"data": {"max_class_imbalance": 5}}))
    assert sum(sizes.values()) == 500 + 9 * 125
    with pytest.raises(UserError, match=r"limit data.max_class_imbalance=3.0"):
        prepare(paths, validate({"data": {"max_class_imbalance": 3}}))


def test_test_split_is_rebuilt_from_data_exactly(tmp_path: Path) -> None:
    write_data(load_sample(), tmp_path / "data")
    paths, params = Paths(tmp_path), validate({})
    rebuilt = test_split(paths, params)  # no artifacts/ yet: rebuilt from data/
    assert not paths.prepared.exists()
    prepare(paths, params)
    prepared = load_split(paths.prepared, "test")
    assert np.array_equal(rebuilt.x, prepared.x) and np.array_equal(rebuilt.y, prepared.y)
    assert len(rebuilt.y) == 1000
