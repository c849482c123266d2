"""Confusion analysis and Grad-CAM on hand-made examples whose answers are known."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
from PIL import Image

from pipeline.analysis import read_matrix_csv, write_analysis
from pipeline.gradcam import gradcam, write_gradcam

CLASSES = ["cat", "dog", "bird/fish"]
Y_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
Y_PROB = np.array([
    [0.90, 0.05, 0.05],  # right
    [0.20, 0.70, 0.10],  # cat taken for dog (0.70)
    [0.30, 0.60, 0.10],  # cat taken for dog (0.60)
    [0.10, 0.80, 0.10],  # right
    [0.05, 0.90, 0.05],  # right
    [0.10, 0.85, 0.05],  # right
    [0.95, 0.03, 0.02],  # bird/fish taken for cat (0.95): the most confident mistake
    [0.10, 0.10, 0.80],  # right
    [0.10, 0.20, 0.70],  # right
    [0.20, 0.10, 0.70],  # right
])


def rows(path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_confusion_analysis_of_a_known_example(tmp_path):
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 6, 6, 1), dtype=np.uint8)
    worst = write_analysis(tmp_path, Y_TRUE, Y_PROB, images, CLASSES)

    np.testing.assert_array_equal(worst, [6, 1, 2])  # the wrong ones, most confident first
    counts, names = read_matrix_csv(tmp_path / "confusion_counts.csv")
    assert names == CLASSES
    np.testing.assert_array_equal(counts, [[1, 2, 0], [0, 3, 0], [1, 0, 3]])
    normalized, _ = read_matrix_csv(tmp_path / "confusion_normalized.csv")
    np.testing.assert_allclose(normalized, [[1 / 3, 2 / 3, 0], [0, 1, 0], [0.25, 0, 0.75]], atol=1e-4)

    pairs = rows(tmp_path / "confused_pairs.csv")
    assert [(p["true"], p["predicted"], int(p["count"])) for p in pairs] == [("cat", "dog", 2), ("bird/fish", "cat", 1)]
    assert float(pairs[0]["share_of_true"]) == pytest.approx(2 / 3, abs=1e-4)

    per_class = rows(tmp_path / "per_class_accuracy.csv")
    assert [(r["class"], float(r["accuracy"])) for r in per_class] == [
        ("cat", pytest.approx(1 / 3, abs=1e-4)), ("bird/fish", 0.75), ("dog", 1.0)]  # worst first
    assert float(per_class[2]["precision"]) == pytest.approx(0.6)  # dog: 3 of 5 predictions right

    report = (tmp_path / "classification_report.txt").read_text()
    assert "bird/fish" in report and "macro avg" in report
    for name in ("confusion_matrix", "per_class_accuracy", "confidence_histogram", "worst_misclassified"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.size[0] > 200 and image.size[1] > 100


def test_a_perfect_model_still_gets_every_file(tmp_path):
    y_prob = np.eye(3)[Y_TRUE]
    worst = write_analysis(tmp_path, Y_TRUE, y_prob, np.zeros((10, 4, 4, 3), dtype=np.uint8), CLASSES)
    assert len(worst) == 0
    assert rows(tmp_path / "confused_pairs.csv") == []
    assert (tmp_path / "worst_misclassified.png").is_file()


def bright_vs_dark_model(dtype: str = "float32") -> keras.Model:
    """Class 0 scores the bright pixels, class 1 the dark ones: feature channel 0 = x, channel 1 = 1 - x."""
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(2, 1, activation="relu", name="features", dtype=dtype)
    x = conv(inputs)
    x = keras.layers.Flatten(dtype=dtype)(x)
    dense = keras.layers.Dense(2, activation="softmax", dtype=dtype)
    outputs = dense(x)
    model = keras.Model(inputs, outputs)
    conv.set_weights([np.array([1.0, -1.0]).reshape(1, 1, 1, 2), np.array([0.0, 1.0])])
    kernel = np.zeros((128, 2))
    kernel[0::2, 0] = 1  # flattened (8, 8, 2): even entries are channel 0
    kernel[1::2, 1] = 1
    dense.set_weights([kernel, np.zeros(2)])
    return model


def test_gradcam_points_at_the_pixels_behind_each_class():
    image = np.zeros((1, 8, 8, 1), dtype=np.float32)
    image[0, :3, :3] = 1.0  # a bright square top left
    model = bright_vs_dark_model()
    maps = gradcam(model, np.concatenate([image, image]), np.array([0, 1]))
    square = image[0, ..., 0] == 1
    # class 0 - mean class: weights +1/2 on channel 0, -1/2 on channel 1: relu(x - 1/2), the square
    np.testing.assert_allclose(maps[0], square.astype(float), atol=1e-5)
    np.testing.assert_allclose(maps[1], (~square).astype(float), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])  # `train.precision`: bfloat16 maps
def test_gradcam_figure(tmp_path, dtype):
    model = bright_vs_dark_model(dtype)
    images = np.zeros((2, 8, 8, 1), dtype=np.uint8)  # as the stages hold them
    images[:, :3, :3] = 1
    assert gradcam(model, images, np.array([0, 1])).dtype == np.float32  # matplotlib cannot scale bfloat16 maps
    y_prob = model.predict(images, verbose=0)
    write_gradcam(tmp_path / "gradcam.png", model, images, np.array([1, 1]), y_prob, ["bright", "dark"])
    with Image.open(tmp_path / "gradcam.png") as figure:
        assert figure.size[0] > 200
