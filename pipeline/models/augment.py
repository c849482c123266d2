"""Augmentation layers from the data set's `data.augment` config: active in training, identity at inference."""

from __future__ import annotations

import keras
from keras import layers

from pipeline.models import nested_layers
from pipeline.schema import AugmentConfig

# Keras marks these `supports_jit = False`: TensorFlow's ImageProjectiveTransformV3 has no XLA kernel.
AFFINE_LAYERS = (layers.RandomTranslation, layers.RandomZoom, layers.RandomRotation)


def build_augmentation(cfg: AugmentConfig, seed: int, image_shape: tuple[int, ...]) -> keras.Sequential:
    """The data set's random transforms (`data.augment`), in a fixed order (geometry, then erasing). Each layer
    draws from its own stream (`seed` + its position): one seed for all would tie their draws together (a flip
    would always come with the same shift)."""
    steps = []
    height, width = image_shape[:2]
    if cfg.flip:
        steps.append(lambda s: layers.RandomFlip("horizontal", seed=s))
    if cfg.crop_px:  # pad-and-crop: whole-pixel shifts (nearest), the background filled in
        steps.append(lambda s: layers.RandomTranslation(cfg.crop_px / height, cfg.crop_px / width,
                                                        fill_mode="constant", interpolation="nearest", seed=s))
    if cfg.translate:
        steps.append(lambda s: layers.RandomTranslation(cfg.translate, cfg.translate, fill_mode="constant", seed=s))
    if cfg.zoom:
        steps.append(lambda s: layers.RandomZoom(cfg.zoom, fill_mode="constant", seed=s))
    if cfg.rotation:
        steps.append(lambda s: layers.RandomRotation(cfg.rotation, fill_mode="constant", seed=s))
    if cfg.erasing:
        steps.append(lambda s: layers.RandomErasing(factor=cfg.erasing, value_range=(0, 255), seed=s))
    return keras.Sequential([make(seed + i) for i, make in enumerate(steps)], name="augmentation")


def with_augmentation(model: keras.Model, augmentation: keras.Layer, name: str) -> keras.Model:
    """A trained model behind augmentation layers, to go on training it on augmented images."""
    images = keras.Input(shape=model.input_shape[1:], dtype="uint8", name="image")
    return keras.Model(images, model(augmentation(images)), name=name)


def compile_augmentation_on_jax(model: keras.Model) -> None:
    """On JAX, let XLA compile the affine augmentation layers with the rest of the model. Keras marks them as not
    XLA-compatible (TensorFlow's transform has no XLA kernel) and one such layer turns `jit_compile` off for the
    whole model: TensorFlow then still runs a graph, but JAX runs every training step op by op, 157 ms a step
    against 1.7 ms with a flip alone on an H200 (docs/decisions.md). JAX's transform (`map_coordinates`) compiles.
    Call before `compile`; the flag is not saved, so a loaded model is called again with it."""
    if keras.backend.backend() == "jax":
        for layer in nested_layers(model):
            if isinstance(layer, AFFINE_LAYERS):
                layer.supports_jit = True
