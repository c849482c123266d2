"""`python -m pipeline.compare` against a real SQLite store holding real stage runs, tuner trials among them:
the metric table, flipped test images, McNemar's exact test, and the comparison logged as a run of its own."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from types import ModuleType

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from scipy.stats import binomtest

from pipeline import cli, compare, tracking
from pipeline.analysis import read_predictions, write_predictions
from pipeline.compare import FLIP_FIELDS, RIGHT_TO_WRONG, WRONG_TO_RIGHT, flipped, mcnemar, mcnemar_line
from pipeline.outputs import write_stage_outputs
from pipeline.paths import METRICS_DIR, PLOTS_DIR
from pipeline.stages import baseline, cnn, cnn_aug, split
from tests.conftest import UNIT, load_config
from tests.test_analysis import CLASSES as TEST_CLASSES
from tests.test_analysis import Y_PROB, Y_TRUE
from tests.test_model_stages import split_data_overrides
from tests.test_tuning import SEARCHED_CNN

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store; the stages of a test share one execution id."""
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "test-compare")
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def outcomes(b: int, c: int, both_right: int = 3, both_wrong: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Right/wrong of A and B over images: b right in A only, c right in B only, and some they agree on."""
    right_a = [True] * b + [False] * c + [True] * both_right + [False] * both_wrong
    right_b = [False] * b + [True] * c + [True] * both_right + [False] * both_wrong
    return np.array(right_a), np.array(right_b)


@pytest.mark.parametrize("b, c, p_value", [
    (0, 0, 1.0),  # nothing flipped: no evidence either way
    (1, 1, 1.0),
    (0, 5, 2 / 2 ** 5),  # all 5 flips favour B: 2 * P(X = 0), X ~ binomial(5, 1/2)
    (8, 2, 2 * (1 + 10 + 45) / 2 ** 10),  # 2 * P(X <= 2), X ~ binomial(10, 1/2)
])
def test_mcnemar_exact_test_by_hand(b, c, p_value):
    assert mcnemar(*outcomes(b, c)) == (b, c, pytest.approx(p_value))


def test_mcnemar_line_says_whether_the_difference_is_significant():
    assert mcnemar_line(mcnemar(*outcomes(123, 150))) == (  # scipy: 0.1155
        "McNemar exact test: A right/B wrong 123, A wrong/B right 150, p = 0.12 "
        "(the difference is not significant at 0.05)")
    assert mcnemar_line(mcnemar(*outcomes(0, 8))).endswith("p = 0.0078 (the difference is significant at 0.05)")


def test_predictions_round_trip_and_flips_most_confident_first(tmp_path):
    y_true = np.array([0, 1, 2, 0])
    prob_a = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.4, 0.6, 0.0]])
    prob_b = np.array([[0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [0.1234567891, 0.8765432109, 0.0]])
    for name, prob in (("a", prob_a), ("b", prob_b)):
        write_predictions(tmp_path / f"{name}.csv", y_true, prob, CLASSES)
    a, b = (read_predictions(tmp_path / f"{name}.csv") for name in "ab")
    assert (tmp_path / "b.csv").read_text().splitlines()[:2] == ["index,true,predicted,cat,dog,bird",
                                                                 "0,cat,dog,0.2,0.8,0"]
    assert a.classes == CLASSES and a.y_true.tolist() == y_true.tolist() and a.predicted.tolist() == [0, 1, 0, 1]
    assert b.y_prob[3].tolist() == [0.123457, 0.876543, 0.0]  # 6 significant digits
    flips = flipped(a, b)
    assert flips[RIGHT_TO_WRONG].tolist() == [0, 1]  # B wrong on both: 0.8 before 0.6
    assert flips[WRONG_TO_RIGHT].tolist() == [2]


def run_stage(monkeypatch, stage: ModuleType, *overrides: str) -> str:
    """A stage run by its command line (`python -m pipeline.stages.<stage> ...`) in its MLflow run; the run's id."""
    monkeypatch.setattr(sys, "argv", [stage.__name__, "profile=smoke", *UNIT, *overrides])
    cli.stage_main(stage.run)
    name = stage.__name__.rsplit(".", 1)[-1]
    return json.loads((METRICS_DIR / f"{name}.json").read_text(encoding="utf-8"))["mlflow_run_id"]


@pytest.mark.slow  # a search, two trainings
def test_compare_two_stage_runs_in_a_store_with_tuner_trials(split_data, store, tmp_path, monkeypatch, capsys):
    base = (*split_data_overrides(split_data), *SEARCHED_CNN, f"tracking.uri={store}")
    cnn_id = run_stage(monkeypatch, cnn, *base)  # a real 2-trial search: trials are runs tagged pipeline.stage=cnn
    aug_id = run_stage(monkeypatch, cnn_aug, *base, "cnn_aug.init=scratch", "cnn_aug.train.epochs=1")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("fashion_mnist").experiment_id
    latest_cnn = client.search_runs([experiment], "tags.`pipeline.stage` = 'cnn'",
                                    order_by=["attributes.start_time DESC"])
    assert latest_cnn[0].data.tags["pipeline.kind"] == "trial" and len(latest_cnn) == 3  # what compare used to pick

    out = tmp_path / "compare"
    capsys.readouterr()  # what the stages printed
    assert compare.main(["cnn", "cnn_aug", f"tracking.uri={store}", "--out", str(out)]) == 0
    printed, errors = capsys.readouterr()
    print(printed)  # the README's example
    assert "Downloading artifacts" not in errors  # MLflow's progress bars, one per artifact fetched

    runs = [client.get_run(run_id) for run_id in (cnn_id, aug_id)]
    header, *rows = printed.splitlines()
    assert header.split() == ["metric", "cnn", cnn_id[:8], "cnn_aug", aug_id[:8], "B", "-", "A"]
    accuracy = [run.data.metrics["test_accuracy"] for run in runs]
    assert f"{'test_accuracy':<36} {accuracy[0]:>20.4f} {accuracy[1]:>20.4f} {accuracy[1] - accuracy[0]:+10.4f}" in rows

    right = [logged_outcomes(client, run_id, tmp_path / run_id) for run_id in (cnn_id, aug_id)]
    for outcome, run in zip(right, runs, strict=True):  # the logged predictions are the evaluated ones
        assert np.mean(outcome) == pytest.approx(run.data.metrics["test_accuracy"])
    b, c = int(np.sum(right[0] & ~right[1])), int(np.sum(~right[0] & right[1]))
    p_value = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    assert f"McNemar exact test: A right/B wrong {b}, A wrong/B right {c}, p = {p_value:.2g}" in printed
    with (out / "flipped.csv").open() as fh:
        fields, *listed = list(csv.reader(fh))
    assert tuple(fields) == FLIP_FIELDS
    assert {(int(r[0]), r[-1]) for r in listed} == {
        *((int(i), RIGHT_TO_WRONG) for i in np.flatnonzero(right[0] & ~right[1])),
        *((int(i), WRONG_TO_RIGHT) for i in np.flatnonzero(~right[0] & right[1]))}
    assert f"flipped images: {out / 'flipped.png'}" in printed and (out / "flipped.png").stat().st_size > 0

    [logged] = client.search_runs([experiment], "tags.`pipeline.kind` = 'compare'")
    assert printed.rstrip().endswith(f"comparison run: http://127.0.0.1:5000/#/experiments/{experiment}/runs/"
                                     f"{logged.info.run_id}")
    assert logged.info.run_name == "compare cnn vs cnn_aug" and "mlflow.parentRunId" not in logged.data.tags
    assert (logged.data.tags["compare.run_a"], logged.data.tags["compare.run_b"]) == (cnn_id, aug_id)
    assert logged.data.metrics == pytest.approx({
        "mcnemar_p_value": p_value, "flipped_right_to_wrong": b, "flipped_wrong_to_right": c,
        "accuracy_difference": accuracy[1] - accuracy[0]})
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == {
        "compare.txt", "confusion_difference.csv", "confusion_difference.png", "flipped.csv", "flipped.png"}
    assert (out / "compare.txt").read_text() == printed[:printed.rindex("comparison run:")]

    mlflow.set_tracking_uri(store)  # a stage by name is its stage run: never a trial, never the comparison
    assert [tracking.find_run(stage, experiment).info.run_id for stage in ("cnn", "cnn_aug")] == [cnn_id, aug_id]


def logged_outcomes(client: MlflowClient, run_id: str, dest: Path) -> np.ndarray:
    """Right or wrong per test image, from the run's logged analysis/test_predictions.csv, read by hand."""
    dest.mkdir()
    path = client.download_artifacts(run_id, "analysis/test_predictions.csv", str(dest))
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    return np.array([r["true"] == r["predicted"] for r in rows])


@pytest.mark.slow
def test_runs_on_different_test_sets_are_not_compared(split_data, store, tmp_path, monkeypatch, capsys):
    overrides = (*split_data_overrides(split_data), f"tracking.uri={store}")
    first = run_stage(monkeypatch, baseline, *overrides)
    assert (PLOTS_DIR / "baseline" / "test_predictions.csv").is_file()
    split.run(load_config(*overrides, "data.limit_test=50"))  # data/split/ now holds another test split
    second = run_stage(monkeypatch, baseline, *overrides, "data.limit_test=50")
    out = tmp_path / "compare"
    capsys.readouterr()
    assert compare.main([first, second, f"tracking.uri={store}", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: the runs were evaluated on different test sets") and error.count("\n") == 1

    # a run against itself: nothing flipped; the local split is not its test split, so a CSV and no grid
    assert compare.main([first, first, f"tracking.uri={store}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no grid of flipped images: it needs the runs' test split" in printed
    assert "McNemar exact test: A right/B wrong 0, A wrong/B right 0, p = 1 (the difference is not significant" in (
        printed)
    assert (out / "flipped.csv").read_text().splitlines() == [",".join(FLIP_FIELDS)]
    assert not (out / "flipped.png").exists()


def test_hand_made_stage_runs_then_one_from_before_test_predictions(workdir, store, tmp_path, capsys):
    """cnn is right on the 3 test images baseline gets wrong: b = 0, c = 3, p = 2 / 2 ** 3. Then baseline's
    test_predictions.csv goes, as for a run logged before stages wrote it: its metrics still compare."""
    cfg = load_config(f"tracking.uri={store}")
    images = np.zeros((10, 4, 4, 1), dtype=np.uint8)
    ids = []
    for stage, y_prob in (("baseline", Y_PROB), ("cnn", np.eye(3)[Y_TRUE] * 0.9 + 0.1 / 3)):
        with tracking.stage_run(stage, cfg) as opened:
            tracking.log_splits({"test": (images, Y_TRUE)}, workdir / "data" / "split")  # as load_splits does
            write_stage_outputs(stage, Y_TRUE, y_prob, TEST_CLASSES, images=images, val_accuracy=0.5,
                                fit_seconds=1.0, parameters=10, images_per_second=100.0)
        ids.append(opened.id)
    out = tmp_path / "compare"
    capsys.readouterr()
    assert compare.main(["baseline", "cnn", f"tracking.uri={store}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("McNemar exact test: A right/B wrong 0, A wrong/B right 3, p = 0.25 (the difference is not significant "
            "at 0.05)") in printed
    with (out / "flipped.csv").open() as fh:
        assert [row[0] for row in csv.reader(fh)][1:] == ["6", "1", "2"]  # baseline's most confident mistake first
    assert "no grid of flipped images: it needs the runs' test split" in printed  # no data/split/ here

    client = MlflowClient(store)
    artifacts = Path(client.get_run(ids[0]).info.artifact_uri.removeprefix("file://"))
    (artifacts / "analysis" / "test_predictions.csv").unlink()
    assert compare.main(["baseline", "cnn", f"tracking.uri={store}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test_accuracy " in printed and "confusion difference:" in printed
    assert (f"no flipped images or McNemar test: run baseline {ids[0][:8]} predates analysis/test_predictions.csv"
            in printed)
    assert not (out / "flipped.csv").exists()  # the first comparison's is gone
    latest = client.search_runs([client.get_run(ids[0]).info.experiment_id], "tags.`pipeline.kind` = 'compare'",
                                order_by=["attributes.start_time DESC"])
    assert len(latest) == 2 and latest[0].data.metrics == {}


def test_a_stage_name_is_the_run_that_made_the_workspace_outputs_else_the_latest(workdir, store):
    """`make compare A=cnn` after `make repro` and a later `dvc exp run --temp` in the same store: the workspace's
    run, which metrics/cnn.json names; without that file (or naming a run this store lacks), the latest."""
    cfg = load_config(f"tracking.uri={store}")
    ids, outputs = [], []
    for _ in range(2):
        with tracking.stage_run("cnn", cfg) as opened:
            write_stage_outputs("cnn", Y_TRUE, Y_PROB, TEST_CLASSES, images=np.zeros((10, 4, 4, 1), dtype=np.uint8),
                                val_accuracy=0.5, fit_seconds=1.0, parameters=10, images_per_second=100.0)
        ids.append(opened.id)
        outputs.append((METRICS_DIR / "cnn.json").read_text())
    experiment = tracking.connect(cfg)
    (METRICS_DIR / "cnn.json").write_text(outputs[0])
    assert tracking.find_run("cnn", experiment).info.run_id == ids[0]
    (METRICS_DIR / "cnn.json").write_text(outputs[0].replace(ids[0], "0" * 32))  # another store's run
    assert tracking.find_run("cnn", experiment).info.run_id == ids[1]
    (METRICS_DIR / "cnn.json").unlink()
    assert tracking.find_run("cnn", experiment).info.run_id == ids[1]
    with pytest.raises(tracking.TrackingError, match="'cnn' OR 1' is neither a run id"):
        tracking.find_run("cnn' OR 1", experiment)
