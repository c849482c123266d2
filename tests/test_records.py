"""Records you can trust, against a real SQLite store: a run's params are the values its model trained with, an
override that a search would overwrite stops at load, runs end KILLED when stopped, a killed process's runs are
closed by the next run, stage runs carry system metrics, and the registry's champion moves only to a better run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from sqlalchemy.engine.default import DefaultDialect

from pipeline import cli, config, tracking
from pipeline.errors import ConfigError, Terminated
from pipeline.paths import METRICS_DIR, model_dir
from pipeline.stages import baseline, cnn, cnn_aug
from tests.conftest import REPO, load_config
from tests.test_model_stages import SMALL_CNN, split_data_overrides
from tests.test_tuning import SEARCHED_CNN


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv(tracking.EXECUTION_ID_ENV, "test-records")
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def runs_of(store: str, query: str = "") -> list:
    client = tracking.client(store)  # polled while a stage makes the store: under the lock the stage takes
    return client.search_runs([client.get_experiment_by_name("fashion_mnist").experiment_id], query)


@pytest.mark.slow
def test_a_searched_stage_logs_the_values_it_trained_with(split_data, store, tmp_path):
    cfg = load_config(*split_data_overrides(split_data), *SEARCHED_CNN, f"tracking.uri={store}")
    with tracking.stage_run("cnn", cfg) as cnn_opened:
        metrics = cnn.run(cfg)
    best = json.loads((model_dir("cnn") / "best_hparams.json").read_text())
    trained = {"cnn.filters": best["values"]["filters"], "cnn.train.lr": best["values"]["lr"]}
    assert best["source"] == "search" and best["trained"] == trained
    run = MlflowClient(store).get_run(cnn_opened.id)
    assert run.data.tags["pipeline.params_source"] == "search"
    assert {k: run.data.params[k] for k in trained} == {k: str(v) for k, v in trained.items()}
    assert run.data.params["cnn.blocks"] == "2"  # not searched: the configured value
    # the configured values and the space stay visible: in config.yaml, and the space as params
    config_file = MlflowClient(store).download_artifacts(cnn_opened.id, "config.yaml", str(tmp_path))
    configured = yaml.safe_load(Path(config_file).read_text())
    assert configured["cnn"]["filters"] == cfg.cnn.filters and configured["cnn"]["search"]["space"]["filters"]
    assert run.data.params["cnn.search.space.filters.choice"] == "[4, 8]"
    # ... and `dvc exp show` shows the trained values: they are in the stage's metrics file
    assert metrics["hparams"] == trained == json.loads((METRICS_DIR / "cnn.json").read_text())["hparams"]

    # cnn_aug trains the cnn stage's searched architecture (built from best_hparams.json, not loaded), and says so
    aug_cfg = load_config(*split_data_overrides(split_data), *SEARCHED_CNN, "cnn_aug.init=scratch",
                          "cnn_aug.train.epochs=1", f"tracking.uri={store}")
    with tracking.stage_run("cnn_aug", aug_cfg) as aug_opened:
        aug_metrics = cnn_aug.run(aug_cfg)
    assert aug_metrics["parameters"] == metrics["parameters"]
    assert cnn_aug_widest_conv() == trained["cnn.filters"] * 2  # cnn.blocks=2: the second block doubles the first's
    aug = MlflowClient(store).get_run(aug_opened.id)
    assert aug.data.params["cnn.filters"] == str(trained["cnn.filters"])
    assert aug.data.tags["pipeline.params_source"] == "search"


def cnn_aug_widest_conv() -> int:
    """The most filters of a conv layer in the saved cnn_aug model."""
    import keras

    model = keras.saving.load_model(model_dir("cnn_aug") / "model.keras", safe_mode=True)
    return max(layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D))


@pytest.mark.slow  # real fits, 14-32 s on 2 cores: make test runs it, make test-fast does not
def test_without_a_search_the_configured_values_are_logged_as_such(split_data, store):
    cfg = load_config(*split_data_overrides(split_data), *SMALL_CNN, f"tracking.uri={store}")
    with tracking.stage_run("cnn", cfg) as cnn_opened:
        cnn.run(cfg)
    run = MlflowClient(store).get_run(cnn_opened.id)
    assert run.data.tags["pipeline.params_source"] == "config"
    assert run.data.params["cnn.filters"] == "8" and run.data.params["cnn.train.lr"] == str(cfg.cnn.train.lr)
    # every key DVC tracks for the stage is a param: none deferred and forgotten
    assert set(tracking.stage_params("cnn", cfg)) <= set(run.data.params)


@pytest.mark.parametrize("overrides, key", [
    (["cnn.dropout=0.3"], "cnn.dropout"),
    (["cnn.train.lr=0.02"], "cnn.train.lr"),
    (["profile=gpu", "transfer.head_units=7"], "transfer.head_units"),
])
def test_an_override_the_search_would_overwrite_stops_at_load(workdir, overrides, key):
    section = key.split(".")[0]
    space = f"{section}.search.space.{key.rsplit('.', 1)[1]}"
    message = (f"{key} is overridden, but the {section} search sets it ({space}): turn the search off "
               f"({section}.search.enabled=false) or take it out of the space (~{space})")
    with pytest.raises(ConfigError) as raised:
        config.load(overrides=overrides)
    assert str(raised.value) == f"conf/ + overrides: {message}"
    # as `dvc exp run -S` does it: DVC composes conf/ with the override into params.yaml, and the stage loads that
    config.write_params(workdir / "params.yaml", overrides)
    with pytest.raises(ConfigError) as raised:
        config.load(workdir / "params.yaml")
    assert str(raised.value) == f"{workdir / 'params.yaml'}: {message}"


@pytest.mark.parametrize("overrides", [
    ["cnn.dropout=0.3", "cnn.search.enabled=false"],  # the two ways out
    ["cnn.dropout=0.3", "~cnn.search.space.dropout"],
    ["transfer=resnet50", "profile=gpu"],  # another option of a group: its values are conf/'s, not overrides
    ["cnn.convs_per_block=1"],  # not searched
])
def test_overrides_the_search_does_not_touch_load(overrides):
    config.load(overrides=overrides)


def stage_command(split_data, store: str, *extra: str) -> list[str]:
    """The cnn stage's command line with a search long enough to be stopped in a trial."""
    return [sys.executable, "-m", "pipeline.stages.cnn", "profile=smoke", *split_data_overrides(split_data),
            *SEARCHED_CNN, "tuner.epochs=200", "tuner.patience=200", "tracking.system_metrics=false",
            f"tracking.uri={store}"]


def start_and_wait_for_a_trial(command: list[str], store: str, workdir) -> subprocess.Popen:
    """Started with SIGINT ignored, as a shell without job control starts `cmd &` (CI scripts, `nohup ... &`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), tracking.EXECUTION_ID_ENV: "a-stage-run-by-hand"}
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while not _running_trial(store):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(1)
    return process


def _running_trial(store: str) -> bool:
    try:
        runs = runs_of(store, "tags.`pipeline.kind` = 'trial' and attributes.status = 'RUNNING'")
    except Exception:  # the store or the experiment is not made yet
        return False
    return any("val_accuracy" in r.data.metrics for r in runs)  # a trial that has finished an epoch


def statuses(store: str) -> dict[str, str]:
    return {r.data.tags["pipeline.kind"]: r.info.status for r in runs_of(store)}


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_stage_ends_its_runs_killed(split_data, store, workdir, signum, code):
    process = start_and_wait_for_a_trial(stage_command(split_data, store), store, workdir)
    process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"still running 60 s after signal {signum}; its output ends:\n{output[-6000:]}")
    assert process.returncode == code, output
    assert statuses(store) == {"execution": "KILLED", "stage": "KILLED", "trial": "KILLED"}
    assert "Traceback" not in output


def test_a_stop_that_lands_inside_a_store_query_lets_the_query_end(store, monkeypatch):
    """A SIGTERM raised between a SELECT's execution and its fetch leaves SQLite's statement open in the frames of
    the exception's traceback: SQLAlchemy closes the connection, but SQLite keeps it, and its read lock, until the
    statement is freed; the KILLED bookkeeping then waited on that lock (CI: still running 60 s after the signal)."""
    cfg = load_config(f"tracking.uri={store}", "tracking.system_metrics=false")
    signalled = []

    def signalling(execute):
        def signal_once(self, cursor, statement, *args, **kwargs):
            result = execute(self, cursor, statement, *args, **kwargs)
            if not signalled and statement.lstrip().startswith("SELECT"):
                signalled.append(statement)
                os.kill(os.getpid(), signal.SIGTERM)  # its handler runs at the next bytecode: inside SQLAlchemy
            return result
        return signal_once

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cli.stop_on_signals()
    try:
        with pytest.raises(Terminated), tracking.stage_run("baseline", cfg) as opened:
            tracking.active_run_id()  # the run open and active here: the statements patched below are the epoch's
            for name in ("do_execute", "do_executemany"):
                monkeypatch.setattr(DefaultDialect, name, signalling(getattr(DefaultDialect, name)))
            tracking.log_epoch({"loss": 0.5}, epoch=1)
            time.sleep(30)  # the signal, sent again, lands here
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    run = MlflowClient(store).get_run(opened.id)
    assert signalled and run.info.status == "KILLED"
    assert run.data.metrics == {"train_loss": 0.5}  # the interrupted write completed


@pytest.mark.slow
def test_runs_of_a_sigkilled_stage_are_closed_by_the_next_run(split_data, store, workdir):
    process = start_and_wait_for_a_trial(stage_command(split_data, store), store, workdir)
    process.kill()
    process.wait(timeout=30)
    assert set(statuses(store).values()) == {"RUNNING"}  # nobody could close them

    cfg = load_config(*split_data_overrides(split_data), f"tracking.uri={store}")
    with tracking.stage_run("baseline", cfg):
        pass
    runs = runs_of(store, "tags.`pipeline.execution_id` = 'a-stage-run-by-hand'")
    assert {r.data.tags["pipeline.kind"] for r in runs} == {"stage", "trial", "execution"}
    for run in runs:
        assert run.info.status == "KILLED" and run.info.end_time
        assert f"process {process.pid} ended without closing it" in run.data.tags["mlflow.note.content"]


def test_stage_runs_carry_system_metrics(split_data, store):
    cfg = load_config(*split_data_overrides(split_data), f"tracking.uri={store}",
                      "tracking.system_metrics_interval_s=1")
    with tracking.stage_run("baseline", cfg) as opened:
        baseline.run(cfg)
        time.sleep(2.5)  # the monitor logs a sample a second
    metrics = MlflowClient(store).get_run(opened.id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


@pytest.mark.slow  # three baseline stage runs, each logging its model
def test_the_champion_moves_only_to_a_better_run_on_the_same_validation_split(split_data, store):
    cfg = load_config(*split_data_overrides(split_data), f"tracking.uri={store}")
    ids = []
    for _ in range(3):
        with tracking.stage_run("baseline", cfg) as opened:
            baseline.run(cfg)
        ids.append(opened.id)
    client = MlflowClient(store)
    with tracking.stage_run("report", cfg):
        assert tracking.register_champion(ids[0], "fashion_mnist", 0.80) == "1"
        assert tracking.register_champion(ids[1], "fashion_mnist", 0.70) == "1"  # worse: registered, not champion
        assert tracking.register_champion(ids[2], "fashion_mnist", 0.90) == "3"
        assert tracking.register_champion(ids[2], "fashion_mnist", 0.90) == "3"  # again: no new version
    assert client.get_model_version_by_alias("fashion_mnist", "champion").run_id == ids[2]
    assert len(client.search_model_versions("name = 'fashion_mnist'")) == 3
