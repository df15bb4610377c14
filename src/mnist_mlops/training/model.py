"""The ConvNet: a keras.Sequential built from a list of layers chosen by params.yaml."""

from __future__ import annotations

from mnist_mlops.config import ModelParams
from mnist_mlops.preprocess import INPUT_SHAPE


def conv_layers(params: ModelParams) -> list:
    """Conv2D(3×3) blocks, each closed by MaxPooling2D(2×2): 28 → 14 → 7 → 3.

    Every layer is named by its place (`conv2_1`: block 2, conv 1). Keras' own names count the
    layers built so far in the process, so a second model built there would save other bytes."""
    from keras import layers

    stack: list = []
    for block, filters in enumerate(params.filters, 1):
        for conv in range(1, params.convs_per_block + 1):
            name = f"conv{block}_{conv}"
            stack.append(layers.Conv2D(filters, (3, 3), padding="same", use_bias=not params.batch_norm,
                                       activation=None if params.batch_norm else "relu", name=name))
            if params.batch_norm:
                stack += [layers.BatchNormalization(momentum=0.9, name=f"{name}_bn"),
                          layers.Activation("relu", name=f"{name}_relu")]
        stack.append(layers.MaxPooling2D((2, 2), name=f"pool{block}"))
    return stack


def build_model(params: ModelParams, seed: int = 42):
    """Input 28×28×1 → conv/pool blocks → dense → dropout → softmax over 10 (augmentation is
    the data pipeline's: see augment.py)."""
    import keras
    from keras import layers

    stack = [keras.Input(shape=INPUT_SHAPE, name="digit"), *conv_layers(params)]
    stack += [layers.Flatten(name="flatten"), layers.Dense(params.dense_units, activation="relu", name="dense")]
    if params.dropout:
        stack.append(layers.Dropout(params.dropout, seed=seed + 3, name="dropout"))
    stack.append(layers.Dense(10, activation="softmax", name="probabilities"))
    return keras.Sequential(stack, name="mnist_convnet")
