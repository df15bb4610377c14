"""Augmentation: random distortions of each training batch, drawn like the inputs people send.

Rotation, italic shear, size, position (one affine warp per digit), strokes made thicker or
thinner (grey dilation / erosion by a 3×3 cross) and a slight blur, each digit then
stretched to full contrast as the upload conversion does: the corruptions the robustness
slice measures (`robustness.py`), at milder strengths. It runs in the tf.data pipeline on
whole batches, after the cache, so every epoch sees new distortions; the model itself stays
plain (nothing to register or ship with it). The randomness is stateless and seeded from a
seeded `Dataset.random` stream: two trainings with the same seed see the same batches.
"""

from __future__ import annotations

import math

from mnist_mlops.config import AugmentParams

CENTRE = 13.5  # the 28×28 frame's centre, in pixel coordinates


def _uniform(shape, seed, limit: float):
    import tensorflow as tf

    return tf.random.stateless_uniform(shape, seed, -limit, limit)


def affine(x, seeds, a: AugmentParams):
    """One random rotation · shear · scale · shift per digit, about the frame's centre."""
    import tensorflow as tf

    n = tf.shape(x)[0]
    angle = _uniform([n], seeds[0], math.radians(a.rotation_degrees))
    shear = _uniform([n], seeds[1], a.shear)
    scale = tf.exp(_uniform([n], seeds[2], math.log1p(a.scale)))
    dx, dy = tf.unstack(_uniform([2, n], seeds[3], a.shift_pixels))
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    # Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2): the inverse map.
    a0, a1 = cos, -sin + shear * cos
    b0, b1 = sin, cos + shear * sin
    a2 = CENTRE - a0 * (CENTRE + dx) - a1 * (CENTRE + dy)
    b2 = CENTRE - b0 * (CENTRE + dx) - b1 * (CENTRE + dy)
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(images=x, transforms=transforms, output_shape=[28, 28],
                                                 fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


def _cross(x, reduce):
    """Grey dilation (`tf.maximum`) or erosion (`tf.minimum`) by a 3×3 cross: one pixel of
    stroke, about what a marker adds to or a fine pen takes from a 28×28 digit."""
    import tensorflow as tf

    padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    out = x
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out = reduce(out, padded[:, dy : dy + 28, dx : dx + 28, :])
    return out


def strokes(x, seed, probability: float):
    """With `probability`, a digit's strokes get thicker (dilation) or thinner (erosion, where it
    leaves a stroke to speak of), half and half."""
    import tensorflow as tf

    u = tf.random.stateless_uniform([tf.shape(x)[0], 1, 1, 1], seed)
    thin = _cross(x, tf.minimum)
    kept = tf.reduce_sum(thin, axis=[1, 2, 3], keepdims=True) > 0.3 * tf.reduce_sum(x, axis=[1, 2, 3], keepdims=True)
    return tf.where(u < probability / 2, _cross(x, tf.maximum),
                    tf.where((u < probability) & kept, thin, x))


def blur(x, seed, probability: float):
    """With `probability`, a 3×3 Gaussian blur (σ ≈ 0.8 px)."""
    import tensorflow as tf

    k = tf.constant([0.25, 0.5, 0.25])
    kernel = tf.reshape(k[:, None] * k[None, :], [3, 3, 1, 1])
    u = tf.random.stateless_uniform([tf.shape(x)[0], 1, 1, 1], seed)
    return tf.where(u < probability, tf.nn.conv2d(x, kernel, 1, "SAME"), x)


def full_contrast(x):
    """Each digit stretched so its strongest stroke is 1, as `imaging.to_mnist` does for uploads."""
    import tensorflow as tf

    peak = tf.reduce_max(x, axis=[1, 2, 3], keepdims=True)
    return tf.where(peak > 0, x / tf.maximum(peak, 1e-6), x)


def augment_batch(x, seed, a: AugmentParams):
    """A batch N×28×28×1 in [0, 1] and a stateless seed (2 ints) → the batch distorted."""
    import tensorflow as tf

    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 6))
    x = affine(x, seeds[:4], a)
    x = strokes(x, seeds[4], a.thickness)
    x = blur(x, seeds[5], a.blur)
    return full_contrast(tf.clip_by_value(x, 0.0, 1.0))


def augmented(ds, a: AugmentParams, seed: int):
    """A batched (x, y) dataset → the same with every batch distorted, afresh each epoch."""
    import tensorflow as tf

    if not a.enabled:
        return ds
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(ds, seeds).map(lambda batch, s: (augment_batch(batch[0], s, a), batch[1]),
                                              num_parallel_calls=tf.data.AUTOTUNE)
