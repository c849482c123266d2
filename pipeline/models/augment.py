"""Augmentation layers from the `augment` config: active in training, identity at inference."""

from __future__ import annotations

import keras
from keras import layers

from pipeline.schema import AugmentConfig


def build_augmentation(cfg: AugmentConfig, seed: int, image_shape: tuple[int, ...]) -> keras.Sequential:
    """The data set's random transforms (`data.augment`), in a fixed order (geometry, then erasing)."""
    steps = []
    if cfg.flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if cfg.crop_px:  # pad-and-crop: whole-pixel shifts (nearest), the background filled in
        height, width = image_shape[:2]
        steps.append(layers.RandomTranslation(cfg.crop_px / height, cfg.crop_px / width, fill_mode="constant",
                                              interpolation="nearest", seed=seed))
    if cfg.translate:
        steps.append(layers.RandomTranslation(cfg.translate, cfg.translate, fill_mode="constant", seed=seed))
    if cfg.zoom:
        steps.append(layers.RandomZoom(cfg.zoom, fill_mode="constant", seed=seed))
    if cfg.rotation:
        steps.append(layers.RandomRotation(cfg.rotation, fill_mode="constant", seed=seed))
    if cfg.erasing:
        steps.append(layers.RandomErasing(factor=cfg.erasing, value_range=(0, 255), seed=seed))
    return keras.Sequential(steps, name="augmentation")


def with_augmentation(model: keras.Model, augmentation: keras.Layer, name: str) -> keras.Model:
    """A trained model behind augmentation layers, to go on training it on augmented images."""
    images = keras.Input(shape=model.input_shape[1:], dtype="uint8", name="image")
    return keras.Model(images, model(augmentation(images)), name=name)
