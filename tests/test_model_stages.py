"""Each model stage on the smoke profile and tiny data: outputs written, model reloadable in safe mode."""

from __future__ import annotations

import csv
import json

import joblib
import keras
import numpy as np
import pytest

from pipeline.data.split import load_splits
from pipeline.errors import DataError
from pipeline.models.augment import build_augmentation
from pipeline.models.transfer import build_trunk
from pipeline.paths import METRICS_DIR, PLOTS_DIR, SPLIT_DIR, WORK_DIR, model_dir
from pipeline.stages import baseline, cnn, cnn_aug, finetune, transfer
from tests.conftest import load_config

SMALL_CNN = ("cnn.filters=8", "cnn.blocks=2", "cnn.dense_units=16", "cnn_aug.train.epochs=2",
             "cnn.search.enabled=false")


def check_outputs(stage: str, metrics: dict, n_test: int) -> None:
    assert json.loads((METRICS_DIR / f"{stage}.json").read_text()) == metrics
    assert set(metrics["test"]) == {"accuracy", "top3_accuracy", "macro_f1", "log_loss", "ece"}
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["parameters"] > 0 and metrics["fit_seconds"] > 0
    with (PLOTS_DIR / stage / "confusion.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_test and set(rows[0]) == {"actual", "predicted"}


def test_baseline(split_data):
    metrics = baseline.run(split_data)
    check_outputs("baseline", metrics, 100)
    assert metrics["test"]["accuracy"] > 0.9  # the tiny data set is linearly separable
    model = joblib.load(model_dir("baseline") / "model.joblib")
    assert model.predict_proba(np.zeros((1, 784))).shape == (1, 10)


def test_the_cnn_stage(split_data):  # cnn_aug: below, and from scratch in test_records
    check_keras_stage("cnn", cnn.run(load_config(*split_data_overrides(split_data), *SMALL_CNN)))


@pytest.mark.slow  # a cnn and a cnn_aug stage run
def test_flip_tta_is_logged_beside_the_plain_metrics_for_a_model_trained_on_mirror_images(split_data):
    overrides = (*split_data_overrides(split_data), *SMALL_CNN, "cnn.train.epochs=1", "cnn_aug.train.epochs=1")
    assert not {"test_accuracy_tta", "val_accuracy_tta"} & cnn.run(load_config(*overrides)).keys()  # no flips seen
    metrics = cnn_aug.run(load_config(*overrides))
    model = keras.saving.load_model(model_dir("cnn_aug") / "model.keras", safe_mode=True)
    x, y = load_splits(SPLIT_DIR).test
    probs = model.predict(x, verbose=0) + model.predict(x[:, :, ::-1], verbose=0)  # each image and its mirror
    assert metrics["test_accuracy_tta"] == pytest.approx(np.mean(probs.argmax(axis=1) == y))
    assert 0 <= metrics["val_accuracy_tta"] <= 1 and "accuracy" in metrics["test"]  # the plain metric stays


@pytest.mark.parametrize("data, flips", [("fashion_mnist", True), ("mnist", False)])
def test_each_data_set_sets_its_augmentations(data, flips):
    augmentation = build_augmentation(load_config(f"data={data}").data.augment, 0, (28, 28, 1))
    assert any(isinstance(step, keras.layers.RandomFlip) for step in augmentation.layers) == flips
    image = np.zeros((64, 28, 28, 1), dtype=np.uint8)
    image[:, 14, 14] = 200
    shifted = keras.ops.convert_to_numpy(augmentation(image, training=True))
    rows, cols = np.nonzero(shifted[..., 0] == 200)[1:]  # pad-and-crop: the pixel moves whole pixels, unblurred
    mirrored = 27 - 14  # where a flip takes column 14
    assert len(rows) == 64 and np.abs(rows - 14).max() <= 2
    assert np.minimum(np.abs(cols - 14), np.abs(cols - mirrored) if flips else 99).max() <= 2
    assert np.count_nonzero(shifted) == 64 and len(set(zip(rows, cols, strict=True))) > 1


@pytest.mark.slow
def test_cnn_aug_continues_from_the_cnn_model(split_data):
    overrides = (*split_data_overrides(split_data), *SMALL_CNN, "cnn_aug.init=cnn")
    cnn.run(load_config(*overrides))
    check_keras_stage("cnn_aug", cnn_aug.run(load_config(*overrides)))
    model = keras.saving.load_model(model_dir("cnn_aug") / "model.keras", safe_mode=True)
    assert [layer.name for layer in model.layers[1:]] == ["augmentation", "cnn"]


@pytest.mark.slow  # real fits, 14-32 s on 2 cores: make test runs it, make test-fast does not
def test_cnn_aug_trains_the_loaded_cnn_model_in_its_own_precision(split_data):
    """A loaded model keeps the dtype policy it was saved with unless told otherwise: cnn_aug (and finetune, the
    same fit loop) must compute in `train.precision`, its output (the softmax) in float32, as the builders make it.
    (The other way round, float32 to bfloat16, finetune does in test_transfer_then_finetune.)"""
    overrides = (*split_data_overrides(split_data), *SMALL_CNN, "cnn_aug.init=cnn",
                 "cnn.train.precision=mixed_bfloat16", "cnn_aug.train.precision=float32")
    cnn.run(load_config(*overrides))
    cnn_aug.run(load_config(*overrides))
    trained = keras.saving.load_model(model_dir("cnn_aug") / "model.keras", safe_mode=True).get_layer("cnn")
    convs = [layer for layer in trained.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and {layer.dtype_policy.name for layer in convs} == {"float32"}
    assert trained.layers[-1].compute_dtype == "float32"


@pytest.mark.slow
def test_transfer_then_finetune(split_data):
    """transfer trains only a head on the frozen hed-VGG16 trunk; finetune then trains only its top
    `unfreeze_blocks` blocks (here 2: block2 and block3 of the trunk cut after block3)."""
    cfg = load_config(*split_data_overrides(split_data), "transfer.head_units=16", "finetune.augment=true",
                      "finetune.unfreeze_blocks=2")
    check_keras_stage("transfer", transfer.run(cfg))
    trained = keras.saving.load_model(model_dir("transfer") / "model.keras", safe_mode=True)
    fresh = build_trunk(cfg.transfer, load_splits(SPLIT_DIR).image_shape)
    for before, after in zip(fresh.get_weights(), trained.get_layer("trunk").get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # frozen: the pretrained trunk is untouched
    assert compute_dtypes(trained.get_layer("trunk")) == {"bfloat16"}  # transfer.trunk_precision: mixed_bfloat16
    assert compute_dtypes(trained.get_layer("head")) == {"float32"}  # transfer.train.precision: float32

    check_keras_stage("finetune", finetune.run(cfg))
    tuned = keras.saving.load_model(model_dir("finetune") / "model.keras", safe_mode=True)
    vgg = tuned.get_layer("transfer").get_layer("trunk").get_layer("vgg16")
    changed = {layer.name for layer in vgg.layers if layer.weights and not all(
        np.array_equal(a, b) for a, b in zip(layer.get_weights(), fresh.get_layer("vgg16").get_layer(
            layer.name).get_weights(), strict=True))}
    assert changed == {"block2_conv1", "block2_conv2", "block3_conv1", "block3_conv2", "block3_conv3"}
    head = tuned.get_layer("transfer").get_layer("head")
    assert compute_dtypes(vgg) == compute_dtypes(head.layers[:-1]) == {"bfloat16"}  # finetune.train.precision
    assert head.layers[-1].compute_dtype == "float32"  # the softmax


def compute_dtypes(layers) -> set[str]:
    """What the convolutions and dense layers among `layers` (or a model's) compute in."""
    return {layer.compute_dtype for layer in getattr(layers, "layers", layers)
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))}


def test_finetune_needs_the_transfer_model(split_data):
    with pytest.raises(DataError, match="models/transfer/model.keras not found"):
        finetune.run(load_config(*split_data_overrides(split_data)))


def check_keras_stage(name: str, metrics: dict) -> None:
    """Outputs written, curves per epoch, the saved model loads in safe mode and is the evaluated one."""
    check_outputs(name, metrics, 100)
    with (PLOTS_DIR / name / "history.csv").open() as fh:
        history = list(csv.DictReader(fh))
    assert [int(row["epoch"]) for row in history] == list(range(1, metrics["epochs"] + 1))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(history[0])
    model = keras.saving.load_model(model_dir(name) / "model.keras", safe_mode=True)
    x_test, y_test = load_splits(SPLIT_DIR).test
    accuracy = np.mean(model.predict(x_test, verbose=0).argmax(axis=1) == y_test)
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])  # the saved model is the evaluated one
    assert not {"fit", "features"} & {p.name for p in (WORK_DIR / name).glob("*")}  # finished: nothing to resume


def split_data_overrides(cfg) -> list[str]:
    """The overrides that made `cfg` (source and checksums of the tiny data)."""
    sums = [f"data.files.{k}.sha256={v.sha256}" for k, v in cfg.data.files.items()]
    return [f"data.source={cfg.data.source}", "data.mirrors=[]", *sums]
