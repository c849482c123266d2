"""`make server`: a real MLflow tracking server on a real PostgreSQL cluster, on loopback; the smoke pipeline (on the
JAX backend) sends every run there (a queued sweep's runs reach a store from DVC's temporary workspaces as the
workspace's do: tests/test_tracking_e2e.py); `pipeline.migrate` moves a store into it and out of it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import migrate, server
from pipeline.search_workers import free_port
from tests.conftest import REPO, http_service, job_runners
from tests.test_pipeline_e2e import (
    MODEL_STAGES,
    SMALL,
    check_records,
    environment,
    repo,  # noqa: F401 (a fixture)
    run,
)

pytestmark = pytest.mark.slow


@dataclass
class Server:
    uri: str
    root: Path  # its cluster and artifacts

    @property
    def overrides(self) -> list[str]:
        return ["-S", "tracking=server", "-S", f"tracking.uri={self.uri}"]


def serve(root: Path, port: int, stop: signal.Signals = signal.SIGINT):
    """`python -m pipeline.server` on `port`, its state in `root`; stopped by Ctrl-C, as at a terminal."""
    uri = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pipeline.server", f"tracking.uri={uri}", "--dir", str(root), "--workers", "1"]
    return http_service(command, uri, stop=stop)


def reachable_dir(tmp_path_factory) -> Path:
    """A directory PostgreSQL's system user can reach where the tests run as root (pytest's temporary
    directories are private to their owner)."""
    root = tmp_path_factory.mktemp("server")
    if os.geteuid() == 0:
        for parent in [root, *root.parents][:-1]:
            parent.chmod(parent.stat().st_mode | 0o011)  # others may pass through, not list
    return root


@pytest.fixture
def tracking_server(tmp_path_factory) -> Server:
    root = reachable_dir(tmp_path_factory)
    port = free_port()
    with serve(root, port):
        yield Server(f"http://127.0.0.1:{port}", root)


def test_the_smoke_pipeline_on_jax_lands_on_the_server(repo, tmp_path, tracking_server):  # noqa: F811
    """Both paths off the default in one smoke run, to keep the suite short. KERAS_BACKEND=jax, as on a GPU machine
    with JAX and no TensorFlow: every stage runs, the logged models say they need JAX, and Grad-CAM draws its maps
    through JAX's gradients. Tracked on the server: every run, metric history, artifact and model is there."""
    # the suite's longest test: cnn_aug with the data set's augmentation (flip and pad-and-crop, which XLA compiles
    # with the model: `augment.compile_augmentation_on_jax`), and a cnn and cnn_aug of 3 epochs and 2 blocks, not the
    # profile's 30 and 12 epochs of 4 (an epoch on JAX here costs 3 on TensorFlow, and each stage compiles its net:
    # cnn 54 s with 4 blocks, 42 s with 2; the test 258 s, then 238 s): they stay near chance, transfer's head shows
    # that a fit on JAX learns, and the TensorFlow smoke test that each stage does; no searches (the TensorFlow smoke
    # test and test_tuning run them: here each trial would be XLA compiles)
    lighter = ["-S", "data.augment.flip=true", "-S", "cnn.train.min_images=600",
               "-S", "cnn_aug.train.min_images=600", "-S", "cnn.blocks=2", "-S", "cnn.search.enabled=false",
               "-S", "transfer.search.enabled=false"]
    result = subprocess.run(["dvc", "exp", "run", *SMALL, *lighter, *tracking_server.overrides], cwd=repo,
                            capture_output=True, text=True, env={**environment(), "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in MODEL_STAGES:
        assert f"Running stage '{stage}'" in result.stdout + result.stderr
    assert json.loads((repo / "metrics/transfer.json").read_text())["test"]["accuracy"] >= 0.5
    assert (repo / "plots/cnn/gradcam.png").is_file() and "Grad-CAM skipped" not in result.stderr
    requirements = {p.read_text() for p in (tracking_server.root / "artifacts").rglob("requirements.txt")}
    assert requirements and all("jax==" in r and "tensorflow" not in r for r in requirements if "keras==" in r)
    assert not (repo / "mlruns" / "mlflow.db").exists()  # nothing went to a local store
    check_records(repo, tracking_server.uri, searched=False)  # one tree, trained params, a champion, compare

    client = MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    [cnn] = client.search_runs([experiment], "tags.`pipeline.kind` = 'stage' and tags.`pipeline.stage` = 'cnn'")
    history = client.get_metric_history(cnn.info.run_id, "val_accuracy")
    assert len(history) >= 2 and [m.step for m in history] == sorted(m.step for m in history)
    assert {"analysis", "config.yaml"} <= {a.path for a in client.list_artifacts(cnn.info.run_id)}
    assert list((tracking_server.root / "artifacts").rglob("MLmodel"))  # the server keeps the artifacts

    example = np.load(repo / "data/split/test/x.npy")[:5]  # the champion loads from the server, as anywhere
    assert len(predictions(tracking_server.uri, "models:/tiny@champion", example)) == 5

    # the server's store moves, too (into a SQLite store here): every run, model and alias, and the same predictions
    copy = f"sqlite:///{tmp_path / 'copy' / 'mlflow.db'}"
    assert migrate.main(["--from", tracking_server.uri, "--to", copy]) == 0
    assert_same_store(tracking_server.uri, copy)
    assert np.array_equal(predictions(copy, "models:/tiny@champion", example),
                          predictions(tracking_server.uri, "models:/tiny@champion", example))


def test_a_local_store_moves_to_the_server_once_even_when_the_copy_is_killed(repo, tracking_server):  # noqa: F811
    run(repo, "dvc", "exp", "run", *SMALL, "baseline")
    local = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    mlflow.set_tracking_uri(local)  # a champion, as the report stage registers one
    client = MlflowClient(local)
    [stage] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                 "tags.`pipeline.stage` = 'baseline' and tags.`pipeline.kind` = 'stage'")
    [model] = stage.outputs.model_outputs
    client.create_registered_model("tiny")
    version = client.create_model_version("tiny", f"models:/{model.model_id}", run_id=stage.info.run_id,
                                          model_id=model.model_id)
    client.set_registered_model_alias("tiny", "champion", version.version)

    # killed while it links the baseline's copied model to the copied run: that run is left half-copied
    migrate_to = ["pipeline.migrate", "--to", tracking_server.uri]
    killed = subprocess.run([sys.executable, "-m", "tests.killer", "mlflow:MlflowClient.log_outputs", "1",
                             *migrate_to], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # execution, download and split were copied whole; baseline's copy is deleted and made again
    assert "copied runs: 1, model versions: 1" in run(repo, sys.executable, "-m", *migrate_to)
    assert_same_store(local, tracking_server.uri)
    example = np.load(repo / "data/split/test/x.npy")[:5]
    assert np.array_equal(predictions(local, "models:/tiny@champion", example),
                          predictions(tracking_server.uri, "models:/tiny@champion", example))
    assert "copied runs: 0, model versions: 0" in run(repo, sys.executable, "-m", *migrate_to)  # nothing twice


def test_the_server_makes_its_database_once_and_survives_a_kill(tmp_path_factory):
    """First start: initdb. A SIGKILL of the whole server, database included: the next start recovers the
    database, and the run is there. Ctrl-C then stops the server and its database cleanly."""
    root = reachable_dir(tmp_path_factory)
    port = free_port()
    with serve(root, port, stop=signal.SIGKILL):
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run_id = client.create_run(client.create_experiment("kept")).info.run_id
        client.log_metric(run_id, "loss", 0.5, step=3)
    assert sorted(p.name for p in root.iterdir()) == ["artifacts", "postgres", "postgres.log"]  # no half-made cluster
    with serve(root, port) as process:
        assert [(m.value, m.step) for m in client.get_metric_history(run_id, "loss")] == [(0.5, 3)]
        assert job_runners(process) == []  # MLflow's GenAI job runners cost 20 CPU-seconds at each start
    assert process.returncode == 0 and not (root / "postgres" / "postmaster.pid").exists()


def test_a_server_address_that_is_not_http_is_named_before_anything_starts(tmp_path, capsys):
    assert server.main(["tracking.uri=sqlite:///x.db", "--dir", str(tmp_path / "s")]) == 2
    assert "tracking.uri='sqlite:///x.db': make server needs an http://host:port address" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def assert_same_store(source: str, destination: str, experiment: str = "tiny") -> None:
    """Every run of `source` has a copy in `destination` (`pipeline.copy_of`) with the same name, status, times,
    params, tags, metric histories, dataset inputs, artifacts and parent; logged models load and predict alike;
    registered versions and aliases point at the copies."""
    src, dst = MlflowClient(source), MlflowClient(destination)
    src_runs = src.search_runs([src.get_experiment_by_name(experiment).experiment_id], "")
    copies = {r.data.tags[migrate.COPY_OF]: r for r in
              dst.search_runs([dst.get_experiment_by_name(experiment).experiment_id], "")}
    assert set(copies) == {r.info.run_id for r in src_runs}
    copy_ids = {original: copy.info.run_id for original, copy in copies.items()}
    for original in src_runs:
        copy = copies[original.info.run_id]
        assert (copy.info.run_name, copy.info.status, copy.info.start_time, copy.info.end_time) == (
            original.info.run_name, original.info.status, original.info.start_time, original.info.end_time)
        assert copy.data.params == original.data.params
        parent = original.data.tags.get("mlflow.parentRunId")
        assert copy.data.tags.get("mlflow.parentRunId") == (parent and copy_ids[parent])
        skip = {"mlflow.parentRunId", migrate.COPY_OF}
        assert {k: v for k, v in copy.data.tags.items() if k not in skip} == {
            k: v for k, v in original.data.tags.items() if k not in skip}
        for key in original.data.metrics:
            assert [(m.value, m.step, m.timestamp) for m in dst.get_metric_history(copy.info.run_id, key)] == [
                (m.value, m.step, m.timestamp) for m in src.get_metric_history(original.info.run_id, key)]
        assert sorted((d.dataset.name, d.dataset.digest) for d in copy.inputs.dataset_inputs) == sorted(
            (d.dataset.name, d.dataset.digest) for d in original.inputs.dataset_inputs)
        assert artifact_paths(dst, copy.info.run_id) == artifact_paths(src, original.info.run_id)
        src_models = [o.model_id for o in original.outputs.model_outputs] if original.outputs else []
        dst_models = [o.model_id for o in copy.outputs.model_outputs] if copy.outputs else []
        assert len(dst_models) == len(src_models)
        for src_model, dst_model in zip(src_models, dst_models, strict=True):
            assert dst.get_logged_model(dst_model).source_run_id == copy.info.run_id
            assert dst.get_logged_model(dst_model).params == src.get_logged_model(src_model).params
    for registered in src.search_registered_models():
        aliases = dst.get_registered_model(registered.name).aliases
        for alias, version in registered.aliases.items():
            run_id = src.get_model_version(registered.name, version).run_id
            assert dst.get_model_version(registered.name, aliases[alias]).run_id == copy_ids[run_id]


def predictions(uri: str, model: str, images: np.ndarray) -> np.ndarray:
    """What the model of `uri` predicts for `images`, shaped and typed as its signature asks (a Keras model takes
    images, the baseline flat vectors)."""
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(model)
    spec = loaded.metadata.get_input_schema().inputs[0]
    return np.asarray(loaded.predict(images.reshape(len(images), *spec.shape[1:]).astype(spec.type)))
