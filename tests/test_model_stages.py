"""Each model stage on the smoke profile and tiny data: outputs written, model reloadable in safe mode."""

from __future__ import annotations

import csv
import json

import joblib
import keras
import numpy as np
import pytest

from pipeline.data.split import load_splits
from pipeline.paths import METRICS_DIR, PLOTS_DIR, SPLIT_DIR, WORK_DIR, model_dir
from pipeline.stages import baseline, cnn, cnn_aug
from tests.conftest import load_config

SMALL_CNN = ("cnn.filters=8", "cnn.blocks=2", "cnn.dense_units=16", "cnn_aug.train.epochs=2")


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


@pytest.mark.parametrize("stage", [cnn, cnn_aug], ids=["cnn", "cnn_aug"])
def test_keras_stages(split_data, stage):
    name = stage.__name__.rsplit(".", 1)[-1]
    metrics = stage.run(load_config(*split_data_overrides(split_data), *SMALL_CNN))
    check_outputs(name, metrics, 100)
    with (PLOTS_DIR / name / "history.csv").open() as fh:
        history = list(csv.DictReader(fh))
    assert [int(row["epoch"]) for row in history] == list(range(1, metrics["epochs"] + 1))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"} <= set(history[0])
    model = keras.saving.load_model(model_dir(name) / "model.keras", safe_mode=True)
    x_test, y_test = load_splits(SPLIT_DIR).test
    accuracy = np.mean(model.predict(x_test, verbose=0).argmax(axis=1) == y_test)
    assert accuracy == pytest.approx(metrics["test"]["accuracy"])  # the saved model is the evaluated one
    assert not (WORK_DIR / name).exists()  # finished: no state left to resume


def split_data_overrides(cfg) -> list[str]:
    """The overrides that made `cfg` (source and checksums of the tiny data)."""
    sums = [f"data.files.{k}.sha256={v.sha256}" for k, v in cfg.data.files.items()]
    return [f"data.source={cfg.data.source}", "data.mirrors=[]", *sums]
