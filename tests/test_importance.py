"""Hyperparameter importance from a search's trials: the hyperparameter that drives the score takes the importance,
whatever its kind (number on a log scale, choice, conditional), and too few trials or a constant score say so."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.importance import encode, hyperparameter_importance
from pipeline.paths import model_dir
from pipeline.search_space import Param
from pipeline.tuning import _write_trials
from tests.conftest import load_config

LR = Param("lr", "float", (1e-4, 1e-2), log=True)
FILTERS = Param("filters", "choice", (16, 32, 48))
OPTIMIZER = Param("optimizer", "choice", ("sgd", "adam", "rmsprop"))
BATCH_NORM = Param("batch_norm", "choice", (True, False))
DROPOUT = Param("dropout", "float", (0.1, 0.5), when=("batch_norm", (False,)))


def trials(n: int, score, seed: int = 0) -> list[dict]:
    """`n` completed trials of random lr, filters, optimizer, batch_norm and (without batch norm) dropout, as
    `tuning._trials_table` gives them ("" where inactive), scored by `score(row) + tiny noise`."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"trial": f"{i:02d}", "status": "COMPLETED", "message": "", "epochs": "",
               "lr": float(10 ** rng.uniform(-4, -2)), "filters": int(rng.choice(FILTERS.values)),
               "optimizer": str(rng.choice(OPTIMIZER.values)), "batch_norm": bool(rng.integers(2))}
        row["dropout"] = "" if row["batch_norm"] else float(rng.uniform(0.1, 0.5))
        row["score"] = score(row) + float(rng.normal(0, 0.002))
        rows.append(row)
    return rows


def by_lr(row: dict) -> float:
    """Best at lr = 1e-3, falling off on either side in log10(lr)."""
    return 0.85 - 0.1 * (math.log10(row["lr"]) + 3) ** 2


@pytest.mark.parametrize("direction", ["max", "min"])
def test_the_hyperparameter_the_score_follows_takes_the_importance(direction):
    sign = 1 if direction == "max" else -1  # a loss: the same trials, lower is better
    result = hyperparameter_importance(trials(30, lambda r: sign * by_lr(r)), [LR, FILTERS], direction, seed=0)
    assert result["share"]["lr"] > 0.8
    assert sum(result["share"].values()) == pytest.approx(1.0)
    assert result["mean"]["lr"] > result["mean"]["filters"] and set(result["std"]) == {"lr", "filters"}
    assert result["trustworthy"] and result["trials"] == 30
    assert result["note"] == "permutation importance of a random forest on 30 trials"


def test_a_choice_drives_the_score_whatever_the_order_of_its_values():
    best_in_the_middle = {"sgd": 0.70, "adam": 0.85, "rmsprop": 0.72}  # not monotone in the declared order
    result = hyperparameter_importance(trials(30, lambda r: best_in_the_middle[r["optimizer"]]), [LR, OPTIMIZER],
                                       "max", seed=0)
    assert result["share"]["optimizer"] > 0.8 and result["trustworthy"]


def test_an_inactive_conditional_value_is_a_value_of_its_own():
    def score(row: dict) -> float:  # without batch norm, dropout decides; with it, a middling score
        return 0.80 if row["batch_norm"] else 0.9 - 2 * (row["dropout"] - 0.3) ** 2 - 0.05 * (row["dropout"] < 0.2)

    rows = trials(40, score)
    params = [LR, BATCH_NORM, DROPOUT]
    column = encode(rows, params)[:, 2]
    inactive = np.array([r["dropout"] == "" for r in rows])
    assert inactive.any() and not np.isnan(column).any() and column[inactive].max() < 0.1 <= column[~inactive].min()
    result = hyperparameter_importance(rows, params, "max", seed=0)
    assert result["share"]["dropout"] + result["share"]["batch_norm"] > 0.8 and result["share"]["lr"] < 0.1


def test_too_few_trials_are_computed_but_flagged():
    rows = trials(5, by_lr) + [{"trial": "05", "status": "FAILED", "score": None, "lr": 1e-3, "filters": 16}]
    result = hyperparameter_importance(rows, [LR, FILTERS], "max", seed=0)
    assert result["trials"] == 5 and not result["trustworthy"]  # the failed trial does not count
    assert sum(result["share"].values()) == pytest.approx(1.0)
    assert result["note"] == "too few trials (5) to trust the importance (want 10)"
    many = [LR, FILTERS, OPTIMIZER, BATCH_NORM]  # 3 per hyperparameter: 12
    assert not hyperparameter_importance(trials(11, by_lr), many, "max", seed=0)["trustworthy"]


@pytest.mark.parametrize("n, score, note", [
    (2, by_lr, "too few trials (2) to trust the importance (want 10); none computed below 3 trials"),
    (12, lambda r: 0.1, "the score is the same in all 12 trials: none computed"),
])
def test_no_forest_is_fit_on_two_trials_or_a_constant_score(n, score, note):
    rows = [{**r, "score": score(r)} for r in trials(n, by_lr)]  # without noise
    result = hyperparameter_importance(rows, [LR, FILTERS], "max", seed=0)
    assert result == {"share": {}, "mean": {}, "std": {}, "trials": n, "trustworthy": False, "note": note}


def test_the_search_folder_and_the_stage_run_hold_the_importance(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "test")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    with tracking.stage_run("cnn", load_config(f"tracking.uri={store}")) as opened:
        _write_trials("cnn", trials(30, by_lr), [LR, FILTERS], "val_accuracy", "max", seed=0)
    with (model_dir("cnn") / "search" / "importance.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["hyperparameter"] for r in rows] == ["lr", "filters"]  # most important first
    assert float(rows[0]["importance"]) > 0.8 and float(rows[0]["std"]) >= 0
    assert (model_dir("cnn") / "search" / "trials.png").is_file()
    run = MlflowClient(store).get_run(opened.id)
    assert run.data.metrics["importance/lr"] == pytest.approx(float(rows[0]["importance"]))
    assert run.data.tags["search.importance_note"] == "permutation importance of a random forest on 30 trials"
