"""MLflow tracking against a real SQLite store in a temporary directory: what a stage's run holds."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import cli, tracking
from pipeline.data.split import load_splits
from pipeline.errors import DataError, PipelineError
from pipeline.paths import METRICS_DIR, SPLIT_DIR
from pipeline.stages import baseline, cnn, split
from tests.conftest import REPO, load_config
from tests.test_model_stages import SMALL_CNN, split_data_overrides


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store; the stages of a test share one execution id."""
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "test-execution")
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def tracked(split_data, store, *extra):
    return load_config(*split_data_overrides(split_data), f"tracking.uri={store}", *extra)


def only_run(client: MlflowClient, stage: str):
    experiment = client.get_experiment_by_name("fashion_mnist")
    runs = client.search_runs([experiment.experiment_id], f"tags.`pipeline.stage` = '{stage}'")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow  # a baseline and a cnn stage run, each logging its model: 40 s on 2 cores
def test_stage_runs_hold_tags_params_metrics_inputs_artefacts_and_model(split_data, store):
    cfg = tracked(split_data, store)
    with tracking.stage_run("baseline", cfg) as baseline_opened:
        baseline_metrics = baseline.run(cfg)
    cfg_cnn = tracked(split_data, store, *SMALL_CNN, "cnn.train.epochs=2", "cnn.train.patience=5")
    with tracking.stage_run("cnn", cfg_cnn) as cnn_opened:
        cnn_metrics = cnn.run(cfg_cnn)

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("fashion_mnist")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location.endswith("/store/artifacts")
    run = only_run(client, "baseline")
    assert run.info.run_id == baseline_opened.id and run.info.run_name == "baseline" and run.info.status == "FINISHED"
    assert run.data.tags["pipeline.execution_id"] == "test-execution"
    assert run.data.tags["pipeline.profile"] == "smoke" and run.data.tags["pipeline.data"] == "fashion_mnist"
    # the params of the sections dvc.yaml lists for the stage, flattened, and no others
    assert run.data.params["baseline.C"] == str(cfg.baseline.C) and run.data.params["seed"] == "42"
    assert not any(key.startswith(("cnn.", "data.")) for key in run.data.params)
    metrics = run.data.metrics
    assert metrics["test_accuracy"] == pytest.approx(baseline_metrics["test"]["accuracy"])
    assert {"test_top3_accuracy", "test_macro_f1", "test_log_loss", "test_ece", "best_val_accuracy", "fit_seconds",
            "inference_images_per_second", "parameters", "test_f1/T-shirt_top", "test_recall/Ankle boot",
            "test_precision/Bag"} <= set(metrics)
    assert json.loads((METRICS_DIR / "baseline.json").read_text())["mlflow_run_id"] == baseline_opened.id

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"fashion_mnist-train", "fashion_mnist-val", "fashion_mnist-test"}
    assert {tag.value for d in inputs.values() for tag in d.tags} >= {"training", "validation", "test"}
    assert len(inputs["fashion_mnist-test"].dataset.digest) == 16

    artefacts = {a.path for a in client.list_artifacts(baseline_opened.id, "analysis")}
    assert {f"analysis/{name}" for name in (
        "confusion_matrix.png", "confusion_counts.csv", "confusion_normalized.csv", "confused_pairs.csv",
        "per_class_accuracy.csv", "per_class_accuracy.png", "worst_misclassified.png", "confidence_histogram.png",
        "classification_report.txt")} <= artefacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(baseline_opened.id)}

    cnn_run = only_run(client, "cnn")
    assert cnn_run.info.run_id == cnn_opened.id
    assert {"analysis/gradcam.png", "analysis/training_curves.png"} <= {
        a.path for a in client.list_artifacts(cnn_opened.id, "analysis")}
    history = client.get_metric_history(cnn_opened.id, "val_accuracy")
    assert [m.step for m in history] == [1, 2] == list(range(1, cnn_metrics["epochs"] + 1))
    assert {"train_loss", "train_accuracy", "val_loss", "learning_rate"} <= set(cnn_run.data.metrics)

    x_test = load_splits(SPLIT_DIR).test[0][:3]
    for run_id, example in ((baseline_opened.id, baseline.flatten(x_test)), (cnn_opened.id, x_test)):
        [output] = client.get_run(run_id).outputs.model_outputs
        model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
        assert model.metadata.signature is not None and model.input_example is not None
        assert np.asarray(model.predict(example)).shape == (3, 10)


def test_a_failing_stage_leaves_a_failed_run(split_data, store):
    cfg = tracked(split_data, store)
    with pytest.raises(DataError), tracking.stage_run("cnn", cfg):
        raise DataError("data/split: no split here")
    assert only_run(MlflowClient(store), "cnn").info.status == "FAILED"


def test_a_stage_works_while_its_run_opens_and_its_inputs_wait_for_it(split_data, store, monkeypatch):
    """MLflow's imports and store queries (3-5 s, the bulk of a short stage) run beside the stage's own work: with
    the store held back, the stage logs its inputs and trains; the run then holds them all."""
    released = threading.Event()
    connect = tracking.connect

    def held_back(cfg):
        assert released.wait(60), "the stage waited for its run to open"
        return connect(cfg)

    monkeypatch.setattr(tracking, "connect", held_back)
    cfg = tracked(split_data, store)
    with tracking.stage_run("baseline", cfg) as opened:
        splits = load_splits(SPLIT_DIR)  # logs them as inputs: handed to the opening thread
        assert opened.opening
        released.set()
        baseline.run(cfg)
    run = MlflowClient(store).get_run(opened.id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"fashion_mnist-train", "fashion_mnist-val",
                                                                   "fashion_mnist-test"}
    assert tracking.logged_test_digest(run) == tracking.split_digest(*splits.test)


def test_the_sklearn_model_is_logged_beside_the_stage_and_the_run_ends_once_it_is(split_data, store, monkeypatch):
    """The baseline's logged model (the flavour's imports and the skops file, 1-2 s) goes to the run's thread: with it
    held back, the stage still writes its outputs; the run ends FINISHED with the model once it is logged."""
    released = threading.Event()
    log_model = tracking._log_sklearn_model

    def held_back(model, example):
        assert released.wait(60), "the stage waited for its model to be logged"
        log_model(model, example)

    monkeypatch.setattr(tracking, "_log_sklearn_model", held_back)
    cfg = tracked(split_data, store)
    with tracking.stage_run("baseline", cfg) as opened:
        metrics = baseline.run(cfg)
        assert MlflowClient(store).get_run(opened.id).outputs.model_outputs == []
        released.set()
    run = MlflowClient(store).get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED" and len(run.outputs.model_outputs) == 1


def test_a_model_that_fails_to_log_fails_the_run(split_data, store, monkeypatch):
    def broken(model, example):
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "_log_sklearn_model", broken)
    cfg = tracked(split_data, store)
    with pytest.raises(OSError, match="disk full"), tracking.stage_run("baseline", cfg):
        baseline.run(cfg)
    assert only_run(MlflowClient(store), "baseline").info.status == "FAILED"


def test_stage_modules_import_mlflow_only_to_log():
    """A process that logs nothing (a test calling `run`, `python -c ...`) never pays for MLflow's imports."""
    code = ("import sys; import pipeline.stages.baseline, pipeline.stages.cnn, pipeline.stages.report; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'mlflow'], 'mlflow imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_a_store_that_cannot_be_used_fails_the_stage_in_one_line(split_data, store):
    cfg = tracked(split_data, store)
    client = tracking.client(store)
    client.delete_experiment(client.create_experiment("fashion_mnist"))
    with pytest.raises(tracking.TrackingError, match="experiment 'fashion_mnist' is deleted"):
        with tracking.stage_run("baseline", cfg):
            baseline.run(cfg)  # its first tracking call raises what the opening met


def test_a_stage_interrupted_while_its_run_opens_ends_it_killed(split_data, store):
    cfg = tracked(split_data, store)
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("baseline", cfg) as opened:
        raise KeyboardInterrupt
    client = MlflowClient(store)
    run = client.get_run(opened.id)
    assert run.info.status == "KILLED" and client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"


def test_tuner_trials_are_nested_under_their_stage_run(split_data, store):
    cfg = tracked(split_data, store)
    with tracking.stage_run("cnn", cfg) as parent:
        for i in range(2):
            with tracking.trial_run(f"trial {i}", {"filters": 8 * (i + 1)}):
                tracking.log_epoch({"loss": 1.0, "val_accuracy": 0.5}, 1)
    client = MlflowClient(store)
    trials = client.search_runs([client.get_experiment_by_name("fashion_mnist").experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.id}'", order_by=["attributes.run_name"])
    assert [t.info.run_name for t in trials] == ["trial 0", "trial 1"]
    assert [t.data.params["filters"] for t in trials] == ["8", "16"]
    assert all(t.data.tags["pipeline.stage"] == "cnn" and "train_loss" in t.data.metrics for t in trials)


def test_the_default_store_is_the_dvc_root_s_mlruns(split_data, tmp_path, monkeypatch, caplog):
    """A stage run by its command line under DVC (DVC_ROOT set, as in a temporary workspace) logs to that root."""
    main_repo = tmp_path / "main-repo"
    monkeypatch.setenv("DVC_ROOT", str(main_repo))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-test")
    monkeypatch.setattr(sys, "argv", ["split", "profile=smoke", *split_data_overrides(split_data)])
    cli.stage_main(split.run)
    client = MlflowClient(f"sqlite:///{main_repo / 'mlruns' / 'mlflow.db'}")
    run = only_run(client, "split")
    assert run.data.tags["dvc.exp_name"] == "exp-test"
    assert client.get_experiment(run.info.experiment_id).artifact_location == (
        main_repo / "mlruns" / "artifacts").as_uri()


def test_an_unreachable_tracking_server_is_named_in_one_line(split_data, monkeypatch, caplog):
    uri = "http://127.0.0.1:9"  # discard port: nothing listens
    monkeypatch.setattr(sys, "argv", ["split", "profile=smoke", f"tracking.uri={uri}"])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stopped:
        cli.stage_main(split.run)
    assert stopped.value.code == 2
    assert f"tracking server {uri} is not reachable" in caplog.text and "tracking=local" in caplog.text


def test_the_stage_name_and_dvc_processes():
    assert cli.stage_name(baseline.run) == "baseline"
    assert tracking._is_dvc(["/repo/.venv/bin/python", "/repo/.venv/bin/dvc", "exp", "run"])
    assert tracking._is_dvc(["dvc", "repro"]) and tracking._is_dvc(["python3", "-m", "dvc", "repro"])
    assert not tracking._is_dvc(["bash", "-c", "dvc repro"]) and not tracking._is_dvc(["python", "-m", "pytest"])


def test_tracking_errors_are_pipeline_errors():
    assert issubclass(tracking.TrackingError, PipelineError)


@pytest.mark.new_store  # the real creation, not conftest's copy of a made store
def test_a_new_store_is_made_under_the_lock_the_stages_take(tmp_path):
    """Two processes making a SQLite store's tables at once fail (the race CI met: a test polled the store while a
    stage made it). Any opener waits for a stage holding the lock."""
    db = tmp_path / "mlflow.db"
    opener = [sys.executable, "-c", f"from pipeline import tracking; tracking.client('sqlite:///{db}')"]
    with tracking._store_lock(f"sqlite:///{db}"):
        process = subprocess.Popen(opener, cwd=REPO)
        deadline = time.monotonic() + 60
        while not _waits_for_a_lock(process.pid):
            assert process.poll() is None and not db.exists(), "the store was opened without the lock"
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert process.wait(timeout=60) == 0
    assert "experiments" in {name for (name,) in sqlite3.connect(db).execute("select name from sqlite_master")}


def _waits_for_a_lock(pid: int) -> bool:
    """The kernel's table of file locks lists a blocked waiter as `N: -> FLOCK ADVISORY WRITE <pid> ...`."""
    return any(fields[1:2] == ["->"] and fields[5:6] == [str(pid)]
               for fields in map(str.split, Path("/proc/locks").read_text().splitlines()))


@pytest.mark.slow
def test_a_locked_store_is_retried_and_the_epoch_lands(split_data, store, caplog):
    """Another process's write transaction holds the SQLite lock past MLflow's 20 s busy timeout (as a sibling
    queued experiment can): the epoch's metrics are retried with back-off, not lost, and the fit is not ended."""
    cfg = tracked(split_data, store)
    tracking.connect(cfg)
    database = store.removeprefix("sqlite:///")
    with mlflow.start_run() as run:
        holder = sqlite3.connect(database, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
        release = threading.Timer(22, holder.commit)
        release.start()
        try:
            tracking.log_epoch({"loss": 0.5, "val_accuracy": 0.75}, 1)
        finally:
            release.join()
            holder.close()
    assert "tracking store busy" in caplog.text  # the lock was really met, and waited out
    history = MlflowClient(store).get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.75)]
