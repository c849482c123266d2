"""Everything MLflow, and the only module that calls it.

Store: `tracking.uri`, or by default a SQLite database with artifacts beside it in `<repo>/mlruns/`, where
<repo> is the main repository even when DVC runs an experiment in a temporary workspace: DVC gives every
stage command the main repository's root as DVC_ROOT. One experiment per data set; one run per stage
execution, opened by `pipeline.cli.stage_main`; tuner trials are runs nested in their stage's run.

The logging helpers do nothing when no run is active, so library code calls them unconditionally and a
test that calls a stage's `run` directly writes to no store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import re
import subprocess
import types
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import psutil
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.schema import Config, TrackingConfig

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
DVC_YAML = Path(__file__).resolve().parent.parent / "dvc.yaml"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens on training runs, not GenAI
SERVER_TIMEOUT_S = 5
EXECUTION_ID_ENV = "PIPELINE_EXECUTION_ID"
RUN_ID = re.compile(r"[0-9a-f]{32}")


class TrackingError(PipelineError):
    """The tracking store cannot be used."""


def repo_root() -> Path:
    """The main repository: DVC's DVC_ROOT (set for every stage, to the main repository from a temporary
    workspace too), else the working directory, where stages run."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def store_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or f"sqlite:///{repo_root() / STORE_DIR / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the database; a server keeps its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts")


def connect(cfg: Config) -> str:
    """Point MLflow at the configured store; return the id of the data set's experiment, made on first use."""
    uri = store_uri(cfg.tracking)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment or cfg.data.name
    with _first_use_lock(uri):  # the first query creates a new store's tables
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            location = artifact_root(uri)
            with contextlib.suppress(MlflowException):  # a stage running beside this one may make it first
                return mlflow.create_experiment(name, artifact_location=location and Path(location).as_uri(),
                                                tags=dict([EXPERIMENT_KIND]))
            experiment = mlflow.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment '{name}' is deleted in {uri}: restore it "
                            f"(mlflow experiments restore) or set tracking.experiment")
    if EXPERIMENT_KIND[0] not in experiment.tags:  # made elsewhere, e.g. in the UI
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


@contextlib.contextmanager
def stage_run(stage: str, cfg: Config) -> Iterator[str]:
    """One MLflow run around one execution of `stage`, tagged, with the stage's params and the composed config.

    The run ends FAILED if the stage raises."""
    experiment_id = connect(cfg)
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags(stage, cfg)) as run:
        mlflow.log_params(stage_params(stage, cfg))
        mlflow.log_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), "config.yaml")
        yield run.info.run_id


@contextlib.contextmanager
def trial_run(name: str, params: dict[str, Any]) -> Iterator[str | None]:
    """A run nested in the active stage run for one tuner trial, with its stage's tags and its hyperparameters."""
    parent = mlflow.active_run()
    if parent is None:
        yield None
        return
    tags = {k: v for k, v in parent.data.tags.items() if k.startswith(("pipeline.", "dvc.", "git.", "mlflow.source"))}
    with mlflow.start_run(experiment_id=parent.info.experiment_id, run_name=name, nested=True,
                          tags={**tags, "pipeline.trial": name}) as run:
        mlflow.log_params(params)
        yield run.info.run_id


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def run_tags(stage: str, cfg: Config) -> dict[str, str]:
    """Stage, data set, profile, pipeline execution, DVC experiment and git state of this execution."""
    tags = {"pipeline.stage": stage, "pipeline.data": cfg.data.name, "pipeline.profile": cfg.profile,
            "pipeline.execution_id": execution_id()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        # the experiment's own files (its params, DVC's lock and metrics) do not count as changes
        changes = _git("status", "--porcelain", "--", ".", ":(exclude)params.yaml", ":(exclude)dvc.lock",
                       ":(exclude)metrics")
        if changes is not None:
            tags["git.dirty"] = str(bool(changes)).lower()
    return tags


def execution_id() -> str:
    """An id shared by the stages of one `dvc repro` / `dvc exp run`: PIPELINE_EXECUTION_ID if set, else derived
    from the nearest `dvc` process this stage runs under (its pid and start time); a fresh one without."""
    if os.environ.get(EXECUTION_ID_ENV):
        return os.environ[EXECUTION_ID_ENV]
    for process in psutil.Process().parents():
        with contextlib.suppress(psutil.Error):
            if _is_dvc(process.cmdline()):
                key = f"{os.uname().nodename}:{process.pid}:{process.create_time()}"
                return hashlib.sha256(key.encode()).hexdigest()[:12]
    return uuid.uuid4().hex[:12]


def stage_params(stage: str, cfg: Config) -> dict[str, Any]:
    """The flattened config keys the stage lists in dvc.yaml (what DVC tracks for it); all keys for a stage
    that is not there."""
    flat = flatten(dataclasses.asdict(cfg))
    stages = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]
    if stage not in stages:
        return flat
    listed = [p for p in stages[stage].get("params", []) if isinstance(p, str)]
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in listed)}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def log_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], source: Path) -> None:
    """Each split as an MLflow dataset input, named after the data set, with the digest of its arrays."""
    run = mlflow.active_run()
    if run is None:
        return
    name = run.data.tags.get("pipeline.data", "data")
    for split, (x, y) in splits.items():
        digest = hashlib.sha256()
        for array in (x, y):
            digest.update(np.ascontiguousarray(array).data)
        with warnings.catch_warnings():  # MLflow registers two sources for local paths, and says so each time
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_numpy(x, targets=y, source=str(source.resolve() / split), name=f"{name}-{split}",
                                             digest=digest.hexdigest()[:16])
        mlflow.log_input(dataset, context={"train": "training", "val": "validation"}.get(split, split))


def log_epoch(logs: dict[str, float], epoch: int) -> None:
    """One epoch's train_/val_ loss and accuracy and learning rate, at step `epoch` (1 = the first)."""
    if mlflow.active_run() is None:
        return
    named = {k if k.startswith("val_") or k == "learning_rate" else f"train_{k}": float(v) for k, v in logs.items()}
    mlflow.log_metrics(named, step=epoch)


def log_results(metrics: dict[str, Any], per_class: dict[str, dict[str, float]], plots: Path) -> None:
    """Test metrics, per-class precision/recall/F1, figures and tables of plots/<stage>/ (under analysis/)."""
    if mlflow.active_run() is None:
        return
    values = {f"test_{k}": v for k, v in metrics["test"].items()}
    values.update({k: v for k, v in metrics.items() if k != "test" and isinstance(v, int | float)})
    values["best_val_accuracy"] = values.pop("val_accuracy")
    for name, scores in per_class.items():
        safe = re.sub(r"[^\w\-. ]", "_", name)
        values.update({f"test_{m}/{safe}": scores[m] for m in ("precision", "recall", "f1")})
    mlflow.log_metrics(values)
    mlflow.log_artifacts(str(plots), "analysis")
    image = plots / "confusion_matrix.png"
    if image.is_file():  # as an image too: the UI's chart view shows the selected runs' matrices side by side
        mlflow.log_image(np.asarray(Image.open(image).convert("RGB")), key="confusion_matrix", step=0)


def log_keras_model(model, example: np.ndarray) -> None:
    """The Keras model, with its signature and an input example, as the run's logged model."""
    if mlflow.active_run() is None:
        return
    import keras  # the caller's: only Keras stages get here

    backend = keras.backend.backend()
    requirements = [f"keras=={keras.__version__}", f"{backend}=={importlib.metadata.version(backend)}"]
    # mlflow#16183: the Keras flavour writes the input example before it makes the model's directory
    flavor = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)
    Model.log(artifact_path=None, name="model", flavor=flavor, model=model, input_example=example,
              signature=infer_signature(example, model.predict(example, verbose=0)), pip_requirements=requirements)


def log_sklearn_model(model, example: np.ndarray) -> None:
    """The scikit-learn model (skops format), with its signature and an input example."""
    if mlflow.active_run() is None:
        return
    mlflow.sklearn.log_model(model, name="model", input_example=example, pyfunc_predict_fn="predict_proba",
                             signature=infer_signature(example, model.predict_proba(example)),
                             pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True))


def log_summary(values: dict[str, float], report: Path, tags: dict[str, str]) -> None:
    """The report stage's numbers, its markdown report and tags (the best run)."""
    if mlflow.active_run() is None:
        return
    mlflow.log_metrics(values)
    mlflow.log_artifact(str(report))
    mlflow.set_tags(tags)


def run_link(run_id: str, cfg: TrackingConfig) -> str | None:
    """The run's page in the UI (`make ui`, or the tracking server); None if the store does not know it."""
    try:
        experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    except MlflowException:
        return None
    uri = store_uri(cfg)
    base = uri if uri.startswith(("http://", "https://")) else f"http://{cfg.ui_host}:{cfg.ui_port}"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def find_run(ref: str, experiment_id: str) -> mlflow.entities.Run:
    """A run by id, or the latest finished run of a stage by the stage's name."""
    client = mlflow.MlflowClient()
    if RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            raise TrackingError(f"no run {ref} in {mlflow.get_tracking_uri()}") from None
    runs = client.search_runs([experiment_id], f"tags.`pipeline.stage` = '{ref}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise TrackingError(f"'{ref}' is neither a run id nor a stage with a finished run in "
                            f"{mlflow.get_tracking_uri()}")
    return runs[0]


def download(run_id: str, path: str, dest: Path) -> Path:
    """One artifact of a run, copied into `dest`."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dest)))
    except (MlflowException, OSError):
        raise TrackingError(f"run {run_id} has no artifact {path}") from None


def ui_command(cfg: TrackingConfig) -> list[str] | None:
    """`mlflow ui` against the configured store (None for a tracking server, which is its own UI)."""
    uri = store_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return None
    command = ["mlflow", "ui", "--backend-store-uri", uri, "--host", cfg.ui_host, "--port", str(cfg.ui_port),
               "--workers", "1"]  # one person's UI: more workers only slow its start on 2 cores
    root = artifact_root(uri)
    return command + (["--default-artifact-root", root] if root else [])


def _save_keras_model(path: str, **kwargs) -> None:
    os.makedirs(path)
    mlflow.keras.save_model(path=path, **kwargs)


def _check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise TrackingError(f"tracking server {uri} is not reachable ({reason}): start it, or use "
                            f"tracking=local") from None


@contextlib.contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a SQLite store: concurrent stages (`dvc queue start -j 2`) would both create
    its tables. A server serialises its own."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    with db.with_name(db.name + ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _is_dvc(cmdline: list[str]) -> bool:
    """`dvc ...`, `python .../bin/dvc ...` or `python -m dvc ...`."""
    head = cmdline[:3]
    return any(Path(arg).name == "dvc" for arg in head[:2]) or head[1:3] == ["-m", "dvc"]


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def log_trial_score(score: float) -> None:
    """A tuner trial's score (its best objective value), on the active trial run."""
    if mlflow.active_run() is not None:
        mlflow.log_metric("score", score)


def log_artifacts(directory: Path, artifact_path: str) -> None:
    """A directory of files into the active run, under `artifact_path`."""
    if mlflow.active_run() is not None:
        mlflow.log_artifacts(str(directory), artifact_path)
