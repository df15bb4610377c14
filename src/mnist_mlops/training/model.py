"""The ConvNet: a keras.Sequential built from a list of layers chosen by params.yaml."""

from __future__ import annotations

from mnist_mlops.config import ModelParams
from mnist_mlops.preprocess import INPUT_SHAPE


def conv_layers(params: ModelParams) -> list:
    """Conv2D(3×3) blocks, each closed by MaxPooling2D(2×2): 28 → 14 → 7 → 3."""
    from keras import layers

    stack: list = []
    for filters in params.filters:
        for _ in range(params.convs_per_block):
            stack.append(layers.Conv2D(filters, (3, 3), padding="same", use_bias=not params.batch_norm,
                                       activation=None if params.batch_norm else "relu"))
            if params.batch_norm:
                stack += [layers.BatchNormalization(momentum=0.9), layers.Activation("relu")]
        stack.append(layers.MaxPooling2D((2, 2)))
    return stack


def build_model(params: ModelParams, seed: int = 42):
    """Input 28×28×1 → conv/pool blocks → dense → dropout → softmax over 10 (augmentation is
    the data pipeline's: see augment.py)."""
    import keras
    from keras import layers

    stack = [keras.Input(shape=INPUT_SHAPE), *conv_layers(params)]
    stack += [layers.Flatten(), layers.Dense(params.dense_units, activation="relu")]
    if params.dropout:
        stack.append(layers.Dropout(params.dropout, seed=seed + 3))
    stack.append(layers.Dense(10, activation="softmax"))
    return keras.Sequential(stack, name="mnist_convnet")
