"""A configurable convolutional network: plain conv blocks with a dense head, or a small residual network."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import keras
from keras import layers

from pipeline.schema import CnnConfig


def build_cnn(input_shape: tuple[int, ...], n_classes: int, *, arch: str, blocks: int, filters: int,
              convs_per_block: int, kernel_size: int, batch_norm: bool, dropout: float, dense_units: int,
              augmentation: keras.Layer | None = None) -> keras.Model:
    """`blocks` stages, filters doubling per stage, each halving the resolution.

    plain:  convs [+ batch norm] + ReLU, max pool, dropout; flatten, [dense,] dropout, softmax.
    resnet: a stem conv (half the first width) at full resolution, then residual blocks whose first conv is strided
            (a strided 1x1 conv on the shortcut); global average pooling, [dense,] dropout, softmax. Fewer
            multiply-adds per image than the plain net at the same widths, and no large flatten layer."""
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = augmentation(inputs) if augmentation is not None else inputs  # on 0-255 values, in training only
    x = layers.Rescaling(1.0 / 255)(x)  # casts too: the saved model takes raw uint8 images

    trunk = {"plain": _plain_trunk, "resnet": _resnet_trunk}[arch]
    x = trunk(x, functools.partial(_conv, kernel=kernel_size, batch_norm=batch_norm), blocks=blocks, filters=filters,
              convs_per_block=convs_per_block, dropout=dropout)
    if dense_units:
        x = layers.Dense(dense_units, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")


def _conv(x, width: int, *, kernel: int, batch_norm: bool, strides: int = 1, relu: bool = True):
    x = layers.Conv2D(width, kernel, strides=strides, padding="same", use_bias=not batch_norm)(x)
    if batch_norm:
        x = layers.BatchNormalization(momentum=0.9)(x)  # moving stats settle within short trials
    return layers.Activation("relu")(x) if relu else x


def _plain_trunk(x, conv: Callable, *, blocks: int, filters: int, convs_per_block: int, dropout: float):
    for block in range(blocks):
        for _ in range(convs_per_block):
            x = conv(x, filters * 2**block)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(dropout)(x)
    return layers.Flatten()(x)


def _resnet_trunk(x, conv: Callable, *, blocks: int, filters: int, convs_per_block: int, dropout: float):
    del dropout  # regularised by the head's dropout only
    x = conv(x, max(filters // 2, 1))
    for block in range(blocks):
        width = filters * 2**block
        shortcut = conv(x, width, strides=2, kernel=1, relu=False)
        y = conv(x, width, strides=2, relu=convs_per_block > 1)  # the branch's last conv: no ReLU before the sum
        for i in range(1, convs_per_block):
            y = conv(y, width, relu=i < convs_per_block - 1)
        x = layers.Activation("relu")(layers.Add()([shortcut, y]))
    return layers.GlobalAveragePooling2D()(x)


def build_cnn_from(cfg: CnnConfig, input_shape: tuple[int, ...], n_classes: int,
                   augmentation: keras.Layer | None = None) -> keras.Model:
    """`build_cnn` with the architecture of the `cnn` config section."""
    arch = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("train", "search")}
    return build_cnn(input_shape, n_classes, augmentation=augmentation, **arch)
