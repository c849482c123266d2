"""Every model stage's logged MLflow model loads and predicts where this package cannot be imported: in a fresh
process in an empty directory outside the repository, with `pipeline` blocked (it is installed editable, so it
would otherwise be importable from anywhere), through `mlflow.pyfunc.load_model` and `mlflow models predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import joblib
import keras
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.paths import model_dir
from pipeline.stages import baseline, cnn, cnn_aug, finetune, transfer
from tests.conftest import REPO, load_config
from tests.test_model_stages import SMALL_CNN, split_data_overrides

STAGES = {"baseline": baseline, "cnn": cnn, "cnn_aug": cnn_aug, "transfer": transfer, "finetune": finetune}

# Run first in the foreign process: from then on `pipeline` cannot be found.
BLOCKER = '''
import importlib.abc
import importlib.util
import sys


class NoPipeline(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "pipeline" or name.startswith("pipeline."):
            raise ImportError(f"{name} is blocked: a logged model must load without it")
        return None


sys.meta_path.insert(0, NoPipeline())
try:
    importlib.util.find_spec("pipeline")
except ImportError:
    pass
else:
    raise SystemExit("pipeline is importable")
'''

# Loads each model given on the command line and predicts on its input example, then runs `mlflow models predict` on
# its logged serving example (JSON {"inputs": ...}: the format for a model whose signature is a tensor; CSV would
# become a 2-D data frame); prints, by model, the example and both predictions as JSON.
PREDICT = BLOCKER + '''
import json

import mlflow
import numpy as np
from mlflow.cli import cli

out = {}
for i, uri in enumerate(sys.argv[1:]):
    model = mlflow.pyfunc.load_model(uri)
    example = np.asarray(model.input_example)
    probabilities = np.asarray(model.predict(example), dtype=np.float64)
    served = mlflow.artifacts.download_artifacts(uri, dst_path=f"model{i}") + "/serving_input_example.json"
    cli.main(["models", "predict", "-m", uri, "-i", served, "-o", f"predictions{i}.json", "-t", "json",
              "--env-manager", "local"], standalone_mode=False)
    with open(f"predictions{i}.json") as fh:
        from_cli = json.load(fh)["predictions"]
    out[uri] = {"example": example.tolist(), "dtype": str(example.dtype), "probabilities": probabilities.tolist(),
                "cli": from_cli}
assert not any(name == "pipeline" or name.startswith("pipeline.") for name in sys.modules)
print(json.dumps(out))
'''


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "test-execution")
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


@pytest.fixture
def foreign(tmp_path, store) -> tuple[Path, dict[str, str]]:
    """An empty directory outside the repository, and the environment of a process started there: no PYTHONPATH,
    the test's store."""
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    assert not empty.resolve().is_relative_to(REPO)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return empty, {**env, "MLFLOW_TRACKING_URI": store}


def logged_models(split_data, store) -> dict[str, str]:
    """Train every model stage on the tiny data, each in its MLflow run; the URI of each stage's logged model."""
    cfg = load_config(*split_data_overrides(split_data), f"tracking.uri={store}", *SMALL_CNN, "cnn_aug.init=cnn",
                      "transfer.head_units=16", "finetune.augment=true")
    uris = {}
    for name, stage in STAGES.items():
        with tracking.stage_run(name, cfg) as opened:
            stage.run(cfg)
        [output] = MlflowClient(store).get_run(opened.id).outputs.model_outputs
        uris[name] = f"models:/{output.model_id}"
    return uris


def saved_model_predict(stage: str, example: np.ndarray) -> np.ndarray:
    """What the stage's own saved model (models/<stage>/), in this process, predicts."""
    if stage == "baseline":
        return joblib.load(model_dir(stage) / "model.joblib").predict_proba(example)
    model = keras.saving.load_model(model_dir(stage) / "model.keras", safe_mode=True)
    return model.predict(example, verbose=0)


def foreign_modules(path: Path) -> set[str]:
    """The modules, other than Keras', of the objects a saved Keras model's config names (layers, optimizer,
    loss...): a loader must import them, so a model that names one of this package's needs the package."""
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    modules, todo = set(), [config]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            modules.add(node.get("module") or "keras")
            todo += node.values()
        elif isinstance(node, list):
            todo += node
    return {m for m in modules if m != "keras" and not m.startswith("keras.")}


@pytest.mark.slow  # 60-110 s on 2 cores: five stages trained, then one foreign process
def test_every_stage_model_loads_and_predicts_without_the_package(split_data, store, foreign):
    uris = logged_models(split_data, store)
    for stage in STAGES:
        if stage != "baseline":
            assert foreign_modules(model_dir(stage) / "model.keras") == set(), stage
    empty, env = foreign
    done = subprocess.run([sys.executable, "-c", PREDICT, *uris.values()], cwd=empty, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = json.loads(done.stdout.strip().splitlines()[-1])
    for stage, uri in uris.items():
        example = np.asarray(predicted[uri]["example"], dtype=predicted[uri]["dtype"])
        probabilities = np.asarray(predicted[uri]["probabilities"])
        assert probabilities.shape == (len(example), 10), stage
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5, err_msg=stage)
        np.testing.assert_allclose(probabilities, saved_model_predict(stage, example), atol=1e-6, err_msg=stage)
        np.testing.assert_allclose(predicted[uri]["cli"], probabilities, atol=1e-6, err_msg=stage)
