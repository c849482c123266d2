"""Model builders: plain functions of their hyperparameters, knowing nothing of keras-tuner or files.

Every Keras model takes raw uint8 images (N, H, W, C) and returns class probabilities, so a saved
model needs no preprocessing outside it. Code here is backend-agnostic (`keras.ops`, no `tf.`).
"""

from __future__ import annotations

from collections.abc import Iterator

import keras


def nested_layers(layer: keras.Layer) -> Iterator[keras.Layer]:
    """`layer` and every layer inside it, nested models' layers included."""
    yield layer
    for inner in getattr(layer, "layers", ()):
        yield from nested_layers(inner)
