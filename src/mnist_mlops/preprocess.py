"""The one normalisation used by training, evaluation and serving (no train/serve skew)."""

from __future__ import annotations

import numpy as np

INPUT_SHAPE = (28, 28, 1)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 0..255 (or floats already in 0..1) digits → float32 N×28×28×1 in [0, 1].

    Integer input is divided by 255; float input is taken as already scaled. The channel
    axis is added when missing, so 28×28, N×28×28 and N×28×28×1 are all accepted.
    """
    x = np.asarray(images)
    x = x.astype(np.float32) / 255.0 if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:] != INPUT_SHAPE:
        raise ValueError(f"expected 28×28 digits, got shape {tuple(np.asarray(images).shape)}")
    return x


def to_uint8(x: np.ndarray) -> np.ndarray:
    """`normalize` undone: float digits in [0, 1] (any of its shapes) → uint8 N×28×28 pixels.

    Exact for what `normalize` made of integers (it divides by 255); clipped to 0–255.
    """
    return np.clip(np.rint(np.asarray(x, np.float32).reshape(-1, 28, 28) * 255.0), 0, 255).astype(np.uint8)
