"""Augmentation of training batches (training/augment.py): seeded, bounded, and a no-op at zero."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_mlops.config import AugmentParams
from mnist_mlops.preprocess import normalize
from mnist_mlops.training.data import load_sample

pytestmark = pytest.mark.timeout(120)

ZERO = AugmentParams(rotation_degrees=0, shear=0, scale=0, shift_pixels=0, thickness=0, blur=0)


@pytest.fixture(scope="module")
def batch():
    d = load_sample()
    return normalize(d.images[::100])  # 50 digits, 5 of each


def run(x, seed, params):
    import tensorflow as tf

    from mnist_mlops.training.augment import augment_batch

    return augment_batch(tf.constant(x), tf.constant(seed, tf.int64), params).numpy()


def test_same_seed_same_batch_other_seed_other_batch(batch) -> None:
    a, b, c = (run(batch, seed, AugmentParams()) for seed in ([1, 2], [1, 2], [3, 4]))
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01
    assert np.abs(a - batch).mean() > 0.01  # the default distorts


def test_digits_stay_digits_at_full_contrast(batch) -> None:
    out = run(batch, [5, 6], AugmentParams())
    assert out.shape == batch.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and np.allclose(out.max(axis=(1, 2, 3)), 1.0)


def test_zero_strengths_change_nothing(batch) -> None:
    assert np.abs(run(batch, [7, 8], ZERO) - batch).max() <= 1 / 255


def test_disabled_leaves_the_dataset_as_it_is(batch) -> None:
    import tensorflow as tf

    from mnist_mlops.training.augment import augmented

    ds = tf.data.Dataset.from_tensor_slices((batch, np.arange(len(batch)))).batch(10)
    assert augmented(ds, AugmentParams(enabled=False), seed=0) is ds
    labels = np.concatenate([y.numpy() for _, y in augmented(ds, AugmentParams(), seed=0)])
    assert labels.tolist() == list(range(len(batch)))  # distorted batches keep their labels, in order
