"""Summary features of 28×28 digits: what drift statistics compare, and what the prediction log
records beside each answer.

One function for the three places that need them (the service's log, the reference that the
evaluate stage logs with each model, the monitor), so a feature means the same everywhere.
Vectorised over the batch: 100,000 digits take well under a second.
"""

from __future__ import annotations

import numpy as np

# name -> what it measures (the report's legend)
FEATURES = {
    "ink": "share of pixels over half intensity",
    "height": "bounding box height (pixels)",
    "width": "bounding box width (pixels)",
    "centre_y": "centre of mass, row",
    "centre_x": "centre of mass, column",
    "thickness": "stroke thickness: mean length of horizontal ink runs (pixels)",
}
# The monitoring reference logged with every model (training/evaluate.py writes it, the
# monitor reads it): its artifact path in the model's MLflow run, and how many digits it keeps.
REFERENCE_FILE = "reference.npz"
REFERENCE_ARTIFACT = f"monitoring/{REFERENCE_FILE}"
REFERENCE_DIGITS = 5000
_GRID = np.arange(28, dtype=np.float32)
# A blank digit: fewer than MIN_INK_PIXELS pixels at INK_LEVEL or more (of 255). The thinnest
# real MNIST digit in the sample has 28 such pixels, a digit drawn on the page or uploaded is
# stretched to full contrast first (imaging.to_mnist), and an empty page converts to all zeros.
INK_LEVEL = 64
MIN_INK_PIXELS = 10


def has_ink(images: np.ndarray) -> np.ndarray:
    """Per digit (uint8 N×28×28): whether it holds a digit at all (bool N). A model answers
    anything, blank input too (the all-zero digit reads as a confident "1"): what is answered
    or labelled for a blank input says so instead of trusting that answer."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"has_ink takes uint8 N×28×28 digits, got {x.dtype} {list(x.shape)}")
    return (x >= INK_LEVEL).sum(axis=(1, 2)) >= MIN_INK_PIXELS


def feature_arrays(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per digit (uint8 N×28×28, or floats in [0, 1]): the `FEATURES`, as float32 arrays of N.

    Works on the pixels as given (no float copy of the batch: 100,000 digits are 78 MB as
    uint8, 313 MB as float32); ink is over half intensity either way.
    """
    x = np.asarray(images).reshape(-1, 28, 28)
    ink = x > (127 if np.issubdtype(x.dtype, np.integer) else 0.5)
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    row_mass, col_mass = x.sum(axis=2, dtype=np.float32), x.sum(axis=1, dtype=np.float32)
    mass = np.maximum(row_mass.sum(axis=1), 1e-6)
    # a run starts where a pixel is ink and its left neighbour is not
    starts = ink[:, :, 0].sum(axis=1) + (ink[:, :, 1:] & ~ink[:, :, :-1]).sum(axis=(1, 2))
    ink_pixels = ink.sum(axis=(1, 2), dtype=np.float32)
    return {
        "ink": ink_pixels / 784,
        "height": _extent(rows),
        "width": _extent(cols),
        "centre_y": row_mass @ _GRID / mass,
        "centre_x": col_mass @ _GRID / mass,
        "thickness": ink_pixels / np.maximum(starts, 1),
    }


def _extent(occupied: np.ndarray) -> np.ndarray:
    """Span from the first to the last True along axis 1 (0 for an empty digit)."""
    any_ = occupied.any(axis=1)
    first = occupied.argmax(axis=1)
    last = occupied.shape[1] - 1 - occupied[:, ::-1].argmax(axis=1)
    return np.where(any_, last - first + 1, 0).astype(np.float32)


def feature_records(images: np.ndarray) -> list[dict[str, float]]:
    """The same features as one small dict per digit (the prediction log's fields)."""
    arrays = feature_arrays(images)
    return [{name: round(float(values[i]), 4) for name, values in arrays.items()} for i in range(len(arrays["ink"]))]
