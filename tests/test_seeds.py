"""`train.seeds`: the final model trained once per seed, each fit a child run of the stage's run, the spread on the
stage run and in metrics/<stage>.json, the first seed's model the output; a killed run does not fit finished seeds
again. Real training on tiny data, a real SQLite MLflow store."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.data.split import load_splits
from pipeline.models.cnn import build_cnn_from
from pipeline.paths import METRICS_DIR, SPLIT_DIR, WORK_DIR, model_dir
from pipeline.stages import cnn
from pipeline.training import run_keras_stage
from tests.conftest import load_config
from tests.test_model_stages import split_data_overrides
from tests.test_training import Interrupt, with_callbacks

TINY_CNN = ("cnn.filters=4", "cnn.blocks=1", "cnn.dense_units=8", "cnn.train.epochs=2", "cnn.train.patience=10",
            "cnn.train.batch_size=64", "cnn.search.enabled=false", "tracking.system_metrics=false")


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "test-seeds")
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def config(split_data, store: str, *overrides: str):
    return load_config(*split_data_overrides(split_data), *TINY_CNN, f"tracking.uri={store}", *overrides)


def seed_children(store: str, stage_run_id: str) -> list:
    """The stage run's seed runs, in the order they ran."""
    client = MlflowClient(store)
    runs = client.search_runs([client.get_run(stage_run_id).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{stage_run_id}' and tags.`{tracking.KIND_TAG}` = 'seed'")
    return sorted(runs, key=lambda r: r.info.start_time)


def saved_weights(stage: str = "cnn") -> list[np.ndarray]:
    return keras.saving.load_model(model_dir(stage) / "model.keras", safe_mode=True).get_weights()


def same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_each_seed_is_a_child_run_and_the_stage_run_holds_their_spread(split_data, store):
    cfg = config(split_data, store, "cnn.train.seeds=[3,5]")
    with tracking.stage_run("cnn", cfg) as opened:
        metrics = cnn.run(cfg)
    children = seed_children(store, opened.id)
    assert [(c.info.run_name, c.data.tags["pipeline.seed"], c.data.tags["pipeline.seed_fitted"], c.info.status)
            for c in children] == [(f"seed {s}", str(s), "true", "FINISHED") for s in (3, 5)]
    client = MlflowClient(store)
    for child in children:  # each seed's curves, from its first epoch
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1, 2]
    val = [c.data.metrics["best_val_accuracy"] for c in children]
    test = [c.data.metrics["test_accuracy"] for c in children]

    stage = client.get_run(opened.id).data.metrics
    assert stage["seeds_count"] == 2
    assert stage["seeds_val_accuracy_mean"] == pytest.approx(np.mean(val))
    assert stage["seeds_val_accuracy_std"] == pytest.approx(np.std(val, ddof=1))
    assert stage["seeds_test_accuracy_mean"] == pytest.approx(np.mean(test))
    assert stage["seeds_test_accuracy_std"] == pytest.approx(np.std(test, ddof=1))

    assert json.loads((METRICS_DIR / "cnn.json").read_text()) == metrics
    assert metrics["mlflow_run_id"] == opened.id  # the outputs are recorded on the stage run, not on a seed's
    seeds = metrics["seeds"]
    assert seeds["values"] == [3, 5]
    assert seeds["val_accuracy"]["per_seed"] == pytest.approx(val)
    assert seeds["test_accuracy"]["per_seed"] == pytest.approx(test)
    assert seeds["test_accuracy"]["std"] == pytest.approx(np.std(test, ddof=1))
    # the stage's outputs are the first seed's model: its accuracies, and the weights of a model trained with seed 3
    assert (metrics["val_accuracy"], metrics["test"]["accuracy"]) == (val[0], test[0])
    first = saved_weights()
    assert not (WORK_DIR / "cnn" / "fit").exists()

    alone = config(split_data, store, "seed=3")  # `seeds: []`: one fit with the global seed, as before seeds existed
    with tracking.stage_run("cnn", alone) as alone_opened:
        alone_metrics = cnn.run(alone)
    assert same_weights(saved_weights(), first)
    assert seed_children(store, alone_opened.id) == [] and "seeds" not in alone_metrics
    assert not any(k.startswith("seeds_") for k in client.get_run(alone_opened.id).data.metrics)

    cnn.run(config(split_data, store, "cnn.train.seeds=[5]"))  # one listed seed: one fit with it, and it is used
    assert not same_weights(saved_weights(), first)
    assert "seeds" not in json.loads((METRICS_DIR / "cnn.json").read_text())


class InterruptAfterFirstEpoch(keras.callbacks.Callback):
    """Dies at the end of the first epoch, as a killed process would (after the epoch's state was saved)."""

    def on_epoch_end(self, epoch, logs=None):
        raise Interrupt


@pytest.mark.slow
def test_a_killed_multi_seed_run_does_not_fit_finished_seeds_again(split_data, store):
    cfg = config(split_data, store, "cnn.train.seeds=[3,5]")
    splits = load_splits(SPLIT_DIR)
    epochs_run: list[tuple[int, int]] = []

    def run(kill_seed: int | None = None) -> tuple[str, dict]:
        def build(seed: int) -> keras.Model:
            counter = keras.callbacks.LambdaCallback(
                on_epoch_begin=lambda epoch, logs: epochs_run.append((seed, epoch)))
            extra = [InterruptAfterFirstEpoch()] if seed == kill_seed else []
            return with_callbacks(build_cnn_from(cfg.cnn, splits.image_shape, len(splits.classes)), counter, *extra)

        with tracking.stage_run("cnn", cfg) as opened:
            return opened.id, run_keras_stage("cnn", build, cfg.cnn.train, splits, "settings", cfg)

    with pytest.raises(Interrupt):
        run(kill_seed=5)  # seed 3 finished, seed 5 dies after its first epoch
    assert epochs_run == [(3, 0), (3, 1), (5, 0)]

    epochs_run.clear()
    resumed_id, resumed = run()
    assert epochs_run == [(5, 1)]  # seed 3 is not fitted again; seed 5 goes on from its last finished epoch
    children = seed_children(store, resumed_id)
    assert [(c.info.run_name, c.data.tags["pipeline.seed_fitted"]) for c in children] == [
        ("seed 3", "false"), ("seed 5", "true")]
    client = MlflowClient(store)
    for child in children:  # both show their whole history, the replayed epochs too
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1, 2]
    resumed_weights = saved_weights()

    epochs_run.clear()
    _, uninterrupted = run()
    assert epochs_run == [(3, 0), (3, 1), (5, 0), (5, 1)]
    # the same end state: the first seed's model, its metrics, the seeds (seed 5's second epoch saw other batches)
    assert same_weights(saved_weights(), resumed_weights)
    assert resumed["test"] == uninterrupted["test"] and resumed["val_accuracy"] == uninterrupted["val_accuracy"]
    assert resumed["seeds"]["values"] == uninterrupted["seeds"]["values"] == [3, 5]
    for split in ("val_accuracy", "test_accuracy"):
        assert resumed["seeds"][split]["per_seed"][0] == uninterrupted["seeds"][split]["per_seed"][0]
    assert not (WORK_DIR / "cnn" / "fit").exists()
