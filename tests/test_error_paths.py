"""Every error path ends in one line: each stage's `main` run where its inputs are missing exits 2 with one ERROR
line and no traceback, and a model holding Python code is refused by Keras safe mode, in one line."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import keras
import pytest

from pipeline import stages
from pipeline.cli import stage_main
from pipeline.errors import DataError
from pipeline.outputs import load_keras_model
from pipeline.paths import model_dir
from tests.conftest import UNIT

STAGES = [m.name for m in pkgutil.iter_modules(stages.__path__)]


def test_every_stage_is_walked():
    assert {"download", "split", "baseline", "cnn", "cnn_aug", "transfer", "finetune", "report"} <= set(STAGES)


@pytest.mark.parametrize("name", STAGES)
def test_a_stage_without_its_inputs_stops_in_one_line(name, workdir, tmp_path, monkeypatch, caplog):
    module = importlib.import_module(f"pipeline.stages.{name}")
    monkeypatch.setattr(sys, "argv", [name, "profile=smoke", *UNIT, f"data.source={tmp_path / 'nowhere'}",
                                      "data.mirrors=[]", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        stage_main(module.run)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert exit_.value.code == 2 and len(errors) == 1, caplog.text
    assert errors[0].exc_info is None and "\n" not in errors[0].getMessage() and "Traceback" not in caplog.text


def test_a_model_holding_python_code_is_refused_in_one_line(workdir):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    model_dir("cnn").mkdir(parents=True)
    model.save(model_dir("cnn") / "model.keras")
    with pytest.raises(DataError) as err:
        load_keras_model("cnn", needed_by="cnn_aug")
    assert "safe mode" in str(err.value) and "model.keras" in str(err.value) and "\n" not in str(err.value)
