"""keras-tuner searches: spaces from YAML, every validation error, each tuner kind on tiny data, trials as
nested MLflow runs, a fresh search when the space changes (a killed search: test_kill.py)."""

from __future__ import annotations

import csv
import json

import keras_tuner
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.data.split import load_splits
from pipeline.errors import ConfigError
from pipeline.models.cnn import build_cnn_from
from pipeline.paths import SPLIT_DIR, WORK_DIR, model_dir
from pipeline.search_space import parse_space, tunable_names
from pipeline.stages import cnn
from pipeline.tuning import _search_key, define, epoch_chunks, last_rounds, tune
from tests.conftest import append, load_config
from tests.test_model_stages import SMALL_CNN, split_data_overrides

SPACE = ("~cnn.search.space", "+cnn.search.space={filters: {choice: [4, 8]}, lr: {float: [1.0e-3, 1.0e-2], log: true}}",
         "cnn.search.enabled=true", "tuner.max_trials=2", "tuner.epochs=1", "tuner.subset=null")
SEARCHED_CNN = (*(o for o in SMALL_CNN if not o.startswith("cnn.filters=")), *SPACE)  # the search sets filters


@pytest.mark.parametrize("space, message", [
    ("{filters: {choice: []}}", "cnn.search.space.filters: choice needs a non-empty list of values"),
    ("{blocks: {int: [3, 1]}}", "cnn.search.space.blocks: min 3 > max 1"),
    ("{lr: {float: [0.0, 0.1], log: true}}", "cnn.search.space.lr: log scale needs min > 0, got 0.0"),
    ("{lr: {uniform: [0.0, 0.1]}}", "cnn.search.space.lr: give exactly one of int: ..., float: ..., choice: ..."),
    ("{lr: {float: [0.1, 0.2], scale: log}}", "cnn.search.space.lr: unknown option 'scale'"),
    ("{depth: {int: [1, 2]}}", "cnn.search.space.depth: not a setting of this stage; searchable: arch, blocks"),
    ("{blocks: {int: [1.5, 2]}}", "cnn.search.space.blocks: int needs whole numbers"),
    ("{dropout: {float: [0.1, 0.2], when: {batch_norm: [false]}}}",
     "cnn.search.space.dropout.when: batch_norm must be a choice declared before dropout"),
    ("{batch_norm: {choice: [true]}, dropout: {float: [0.1, 0.2], when: {batch_norm: [false]}}}",
     r"cnn.search.space.dropout.when: \[False\] not among batch_norm's choices \[True\]"),
])
def test_a_bad_space_fails_at_config_load(space, message):
    with pytest.raises(ConfigError, match=message):
        load_config("~cnn.search.space", f"+cnn.search.space={space}")


def test_space_to_hyperparameters_with_a_condition():
    cfg = load_config().cnn
    params = parse_space({"batch_norm": {"choice": [True, False]}, "blocks": {"int": [1, 3]},
                          "lr": {"float": [1e-4, 1e-2], "log": True},
                          "dropout": {"float": [0.1, 0.5], "step": 0.1, "when": {"batch_norm": [False]}}},
                         "cnn.search.space", tunable_names(cfg))
    hp = keras_tuner.HyperParameters()
    values = define(hp, params)
    assert values == {"batch_norm": True, "blocks": 1, "lr": 1e-4}  # defaults; dropout inactive with batch norm
    assert hp.get_config()["space"][2]["config"]["sampling"] == "log"
    chosen = keras_tuner.HyperParameters()
    chosen.values["batch_norm"] = False  # as an oracle would have picked it
    assert define(chosen, params)["dropout"] == pytest.approx(0.1)


def search_cnn(cfg):
    """The cnn stage's search alone (no final fit) on the split data; the best cnn config."""
    splits = load_splits(SPLIT_DIR)
    return tune("cnn", cfg.cnn, lambda c: build_cnn_from(c, splits.image_shape, 10), splits.train, splits.val,
                cfg.tuner, cfg.seed)


@pytest.mark.parametrize("kind, extra", [
    ("random", ()),
    pytest.param("bayesian", (), marks=pytest.mark.slow),
    pytest.param("hyperband", ("tuner.epochs=2",), marks=pytest.mark.slow),  # factor 3: a bracket of 2-epoch trials
    pytest.param("hyperband", ("tuner.epochs=2", "tuner.subset=40", "tuner.subset_mode=growing"),
                 marks=pytest.mark.slow)])
def test_two_trial_search_logs_nested_runs_and_carries_the_best_forward(split_data, tmp_path, monkeypatch, kind,
                                                                        extra):
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "test")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = load_config(*split_data_overrides(split_data), *SEARCHED_CNN, *extra, f"tuner.kind={kind}",
                      f"tracking.uri={store}")
    with tracking.stage_run("cnn", cfg) as opened:
        best_cnn = search_cnn(cfg)

    best = json.loads((model_dir("cnn") / "best_hparams.json").read_text())
    assert best["source"] == "search" and best["tuner"] == kind and set(best["values"]) == {"filters", "lr"}
    with (model_dir("cnn") / "search" / "trials.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == best["trials"] >= 2 and float(rows[0]["score"]) == pytest.approx(best["score"])
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    assert (best_cnn.filters, best_cnn.train.lr) == (best["values"]["filters"], best["values"]["lr"])
    assert (model_dir("cnn") / "search" / "trials.png").is_file()
    assert (model_dir("cnn") / "search" / "importance.csv").is_file()

    client = MlflowClient(store)
    trials = client.search_runs([client.get_run(opened.id).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{opened.id}'")
    assert len(trials) == len(rows)
    for trial in trials:
        assert trial.info.status == "FINISHED" and {"filters", "lr"} <= set(trial.data.params)
        assert "score" in trial.data.metrics and "val_accuracy" in trial.data.metrics
        # every epoch trained (a growing subset's fit runs out of images if it is short of one epoch's batches)
        assert len(client.get_metric_history(trial.info.run_id, "val_accuracy")) == cfg.tuner.epochs
    artefacts = {a.path for a in client.list_artifacts(opened.id, "search")}
    assert artefacts == {"search/trials.csv", "search/trials.png", "search/importance.csv"}
    candidates = len({(r["filters"], r["lr"]) for r in rows})  # Hyperband: a promoted candidate is counted once
    assert client.get_run(opened.id).data.tags["search.importance_note"].startswith(f"too few trials ({candidates})")


def test_growing_subsets_give_each_trial_epoch_the_next_images_and_a_promoted_round_goes_on():
    order = np.random.default_rng(0).permutation(25)
    x, y = np.arange(25) * 10, np.arange(25)
    _, first_round = epoch_chunks((x, y), order, chunk=4, first=0, end=2)
    _, next_round = epoch_chunks((x, y), order, chunk=4, first=2, end=7)  # Hyperband continues it to 7 epochs
    assert list(first_round) == list(order[:8]) and len(set(next_round[:12])) == 12
    assert not set(first_round) & set(next_round[:12])  # 20 images: none seen twice yet
    assert list(next_round[-8:]) == list(order[20:25]) + list(order[:3])  # past the split's end: from its start


def test_a_fit_over_steps_per_epoch_batches_gives_epoch_k_the_kth_chunk():
    """What growing subsets rest on (Keras 3 keeps one iterator across the epochs of a fit with `steps_per_epoch`):
    a frozen model that always answers class 0, on chunks labelled 0, then 1, then 0, scores 1, 0, 1."""
    import keras

    answers_0 = keras.layers.Dense(2, trainable=False, kernel_initializer="zeros",
                                   bias_initializer=keras.initializers.Constant([1, 0]))
    model = keras.Sequential([keras.Input((1,)), answers_0])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    y = np.repeat([0, 1, 0], 8)
    history = model.fit(np.zeros((24, 1), "float32"), y, batch_size=4, steps_per_epoch=2, epochs=3, shuffle=False,
                        verbose=0)
    assert history.history["accuracy"] == [1.0, 0.0, 1.0]


@pytest.mark.slow  # real fits, 14-32 s on 2 cores: make test runs it, make test-fast does not
def test_search_disabled_trains_the_configured_values(split_data):
    cnn.run(load_config(*split_data_overrides(split_data), *SMALL_CNN, "cnn.search.enabled=false"))
    assert json.loads((model_dir("cnn") / "best_hparams.json").read_text()) == {"values": {}, "source": "config",
                                                                                "trained": {
        "cnn.dropout": 0.0, "cnn.train.lr": 3e-3, "cnn.train.weight_decay": 5e-4,
        "cnn.train.label_smoothing": 0.1}}
    assert not (model_dir("cnn") / "search").exists()


@pytest.mark.slow
def test_a_changed_space_starts_a_fresh_search(split_data):
    base = (*split_data_overrides(split_data), *SEARCHED_CNN)
    for cfg in (load_config(*base), load_config(*base, "cnn.search.space.filters.choice=[2, 6]")):
        search_cnn(cfg)
    with (model_dir("cnn") / "search" / "trials.csv").open() as fh:
        assert {row["filters"] for row in csv.DictReader(fh)} <= {"2", "6"}  # no old trial mixed in


def test_a_change_of_the_stages_code_starts_a_fresh_search(code_copy):
    cfg = load_config()
    arrays = (np.arange(8, dtype=np.uint8).reshape(4, 2), np.arange(4, dtype=np.uint8))

    def key() -> str:
        return _search_key("cnn", cfg.cnn, cfg.tuner, cfg.seed, *arrays)

    before = key()
    assert key() == before  # the same code and settings: the finished trials are resumed
    append(code_copy / "pipeline/models/cnn.py", "# a fix\n")
    assert key() != before


@pytest.mark.slow  # a stage run with its search, then two searches
def test_a_change_of_the_final_budget_only_keeps_the_finished_search(split_data):
    base = (*split_data_overrides(split_data), *SEARCHED_CNN, "cnn.train.epochs=1")

    def trials() -> dict[str, float]:
        return {str(p.relative_to(WORK_DIR)): p.stat().st_mtime_ns
                for p in (WORK_DIR / "cnn" / "search").glob("*/trial_*/trial.json")}

    cnn.run(load_config(*base))  # the whole stage: search, fit, clean-up
    first = trials()
    assert len(first) == 2
    # the final fit's epochs, images, patience and seeds: the same search, not one trial run again
    search_cnn(load_config(*base, "cnn.train.epochs=2", "cnn.train.min_images=600", "cnn.train.patience=2",
                           "cnn.train.seeds=[1,2]"))
    assert trials() == first
    search_cnn(load_config(*base, "cnn.train.label_smoothing=0.0"))  # what a trial trains with: a fresh search
    fresh = trials()
    assert fresh and fresh.keys().isdisjoint(first)


def test_importance_counts_each_hyperband_candidate_once_at_its_last_round():
    params = parse_space({"lr": {"float": [1e-3, 1e-2]}}, "cnn.search.space", ["lr"])
    rows = [{"trial": "0", "score": 0.5, "epochs": 1, "lr": 0.001},
            {"trial": "1", "score": 0.6, "epochs": 1, "lr": 0.002},
            {"trial": "2", "score": 0.8, "epochs": 2, "lr": 0.002}]  # trial 2: candidate 1 promoted
    assert [r["trial"] for r in last_rounds(rows, params)] == ["0", "2"]
    random_rows = [{**r, "epochs": ""} for r in rows]
    assert last_rounds(random_rows, params) == random_rows  # other tuners: every trial is a candidate
