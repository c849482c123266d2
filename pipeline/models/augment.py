"""Augmentation layers from the data set's `data.augment` config: active in training, identity at inference."""

from __future__ import annotations

import keras
from keras import layers

from pipeline.schema import AugmentConfig


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
