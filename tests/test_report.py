"""The report stage and the compare command on two hand-made stage results logged to a real store."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import compare, tracking
from pipeline.analysis import read_matrix_csv
from pipeline.errors import DataError
from pipeline.outputs import write_stage_outputs
from pipeline.paths import METRICS_DIR
from pipeline.stages import report
from tests.conftest import load_config
from tests.test_analysis import CLASSES, Y_PROB, Y_TRUE

PERFECT = np.eye(3)[Y_TRUE] * 0.9 + 0.1 / 3  # every answer right


@pytest.fixture
def two_stages(workdir, tmp_path, monkeypatch):
    """baseline (7 of 10 test images right, validation 0.9) and cnn (all right, validation 0.5), each written and
    logged as a model stage does, in one pipeline execution: the best on validation is not the best on test."""
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "exec-1")
    cfg = load_config(f"tracking.uri=sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    images = np.zeros((10, 4, 4, 1), dtype=np.uint8)
    ids = {}
    for stage, y_prob, val in (("baseline", Y_PROB, 0.9), ("cnn", PERFECT, 0.5)):
        with tracking.stage_run(stage, cfg) as opened:
            tracking.log_splits({"test": (images, Y_TRUE)}, workdir / "data" / "split")  # as load_splits does
            write_stage_outputs(stage, Y_TRUE, y_prob, CLASSES, images=images, val_accuracy=val, fit_seconds=1.0,
                                parameters=10, images_per_second=100.0)
        ids[stage] = opened.id
    return cfg, ids


def test_report_ladder_best_on_validation_and_links(two_stages):
    cfg, ids = two_stages
    with tracking.stage_run("report", cfg) as report_opened:
        summary = report.run(cfg)
    assert json.loads((METRICS_DIR / "summary.json").read_text()) == summary
    baseline = summary["stages"]["baseline"]
    assert baseline == {"val_accuracy": 0.9, "test_accuracy": 0.7, "macro_f1": pytest.approx(0.7, abs=0.1),
                        "anchor": "logistic regression (scikit-learn)", "anchor_accuracy": 0.842,
                        "vs_anchor": -0.142, "mlflow_run_id": ids["baseline"]}
    # chosen on validation: baseline, though cnn is right on every test image
    assert summary["best"] == {"stage": "baseline", "val_accuracy": 0.9, "test_accuracy": 0.7,
                               "mlflow_run_id": ids["baseline"]}
    text = report.REPORT.read_text()
    assert f"http://127.0.0.1:5000/#/experiments/1/runs/{ids['cnn']}" in text
    assert "| baseline | 0.9000 | 0.7000 |" in text and "Best (chosen on validation accuracy): **baseline**" in text

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(report_opened.id)
    assert run.data.tags["best_run"] == ids["baseline"] and run.data.metrics["test_accuracy/baseline"] == 0.7
    assert run.data.params["data.anchors.cnn.accuracy"] == "0.934"
    # one tree: the stage runs and the report are children of the execution's run, which holds the ladder
    parents = {client.get_run(i).data.tags["mlflow.parentRunId"] for i in (*ids.values(), report_opened.id)}
    assert len(parents) == 1
    execution = client.get_run(parents.pop())
    assert execution.data.tags["pipeline.kind"] == "execution" and execution.info.status == "FINISHED"
    assert execution.data.tags["best_stage"] == "baseline"
    assert execution.data.metrics == {"val_accuracy/baseline": 0.9, "test_accuracy/baseline": 0.7,
                                      "val_accuracy/cnn": 0.5, "test_accuracy/cnn": 1.0}


def test_a_skipped_stage_appears_as_reused_in_the_next_execution(two_stages, monkeypatch):
    cfg, ids = two_stages
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "exec-2")  # the next `dvc repro`: DVC skips both model stages
    with tracking.stage_run("report", cfg) as report_opened:
        report.run(cfg)
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(report_opened.id).data.tags["mlflow.parentRunId"]
    children = client.search_runs(["1"], f"tags.mlflow.parentRunId = '{parent}'")
    reused = {r.data.tags["pipeline.stage"]: r for r in children if r.data.tags["pipeline.kind"] == "reused"}
    assert set(reused) == {"baseline", "cnn"}
    assert reused["cnn"].data.tags["pipeline.reused_from"] == ids["cnn"]
    assert ids["cnn"] in reused["cnn"].data.tags["mlflow.note.content"]
    assert reused["cnn"].data.metrics == {"val_accuracy": 0.5, "test_accuracy": 1.0}
    assert client.get_run(parent).data.metrics["test_accuracy/cnn"] == 1.0


def test_a_stage_restored_from_another_store_leaves_the_champion_unregistered(two_stages, tmp_path):
    """DVC's run cache (shared by clones, or pulled from a remote) restores a stage whose metrics name a run of
    another MLflow store: the report still finishes, links what this store holds and registers nothing."""
    _, ids = two_stages
    other = load_config(f"tracking.uri=sqlite:///{tmp_path / 'other' / 'mlflow.db'}")
    with tracking.stage_run("report", other):
        summary = report.run(other)
    assert summary["best"]["mlflow_run_id"] == ids["baseline"]
    assert not MlflowClient(other.tracking.uri).search_registered_models()


def test_report_needs_a_model_stage(workdir):
    with pytest.raises(DataError, match="run them first"):
        report.run(load_config())


def test_compare_two_runs_by_stage_name(two_stages, tmp_path, capsys):
    cfg, ids = two_stages
    out = tmp_path / "compare"
    assert compare.main(["baseline", ids["cnn"], f"tracking.uri={cfg.tracking.uri}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    line = next(row for row in printed.splitlines() if row.startswith("test_accuracy "))
    assert line.split()[1:] == ["0.7000", "1.0000", "+0.3000"]
    assert "cat taken for dog: 0.667 -> 0.000" in printed
    difference, classes = read_matrix_csv(out / "confusion_difference.csv")
    assert classes == CLASSES
    np.testing.assert_allclose(difference, [[2 / 3, -2 / 3, 0], [0, 0, 0], [-0.25, 0, 0.25]], atol=1e-4)
    assert (out / "confusion_difference.png").is_file()


def test_compare_names_an_unknown_run(two_stages, tmp_path, capsys):
    cfg, _ = two_stages
    assert compare.main(["baseline", "nosuchstage", f"tracking.uri={cfg.tracking.uri}"]) == 2
    assert "'nosuchstage' is neither a run id nor a stage" in capsys.readouterr().err
