"""A configurable convolutional network: conv blocks with pooling, then a dense head."""

from __future__ import annotations

import dataclasses

import keras
from keras import layers

from pipeline.schema import CnnConfig


def build_cnn(input_shape: tuple[int, ...], n_classes: int, *, blocks: int, filters: int, convs_per_block: int,
              kernel_size: int, batch_norm: bool, dropout: float, dense_units: int,
              augmentation: keras.Layer | None = None) -> keras.Model:
    """`blocks` x (convs [+ batch norm] + ReLU, max pool, dropout), filters doubling per block; dense head."""
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = augmentation(inputs) if augmentation is not None else inputs  # on 0-255 values, in training only
    x = layers.Rescaling(1.0 / 255)(x)  # casts too: the saved model takes raw uint8 images
    for block in range(blocks):
        width = filters * 2**block
        for _ in range(convs_per_block):
            x = layers.Conv2D(width, kernel_size, padding="same", use_bias=not batch_norm)(x)
            if batch_norm:
                x = layers.BatchNormalization(momentum=0.9)(x)  # moving stats settle within short trials
            x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense_units, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")


def build_cnn_from(cfg: CnnConfig, input_shape: tuple[int, ...], n_classes: int,
                   augmentation: keras.Layer | None = None) -> keras.Model:
    """`build_cnn` with the architecture of the `cnn` config section."""
    arch = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("train", "search")}
    return build_cnn(input_shape, n_classes, augmentation=augmentation, **arch)
