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
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from PIL import Image

from pipeline.errors import PipelineError, Terminated
from pipeline.paths import METRICS_DIR
from pipeline.schema import Config, TrackingConfig
from pipeline.search_space import space_keys

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"
DVC_YAML = Path(__file__).resolve().parent.parent / "dvc.yaml"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI opens on training runs, not GenAI
SERVER_TIMEOUT_S = 5
EXECUTION_ID_ENV = "PIPELINE_EXECUTION_ID"
PROCESS_TAG = "pipeline.process"  # host:pid:start of the process that owns a RUNNING run
INTERRUPTS = (KeyboardInterrupt, Terminated)  # SIGINT, SIGTERM: the run ends KILLED
RUN_ID = re.compile(r"[0-9a-f]{32}")
KIND_TAG = "pipeline.kind"  # stage, trial (of a tuner search), seed (one of `train.seeds`), execution, reused (a
# stage DVC skipped), compare


logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # four INFO lines per run otherwise


class _Deferred:
    """`mlflow`, imported on first use. Importing MLflow and its SQLite store costs 3-5 s (its own modules, pandas,
    SQLAlchemy, alembic), the whole of a short stage; deferred, a stage imports it on the thread that opens its run
    (`stage_run`) while it loads its data and trains, and a process that logs nothing never imports it. Two threads
    that import it at once are safe: Python's per-module import lock makes the second wait for the first."""

    def __getattr__(self, name: str) -> Any:
        import mlflow as module

        return getattr(module, name)


mlflow: Any = _Deferred()


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
        check_server(uri)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment or cfg.data.name
    with _store_lock(uri):  # the first query creates a new store's tables
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            location = artifact_root(uri)
            try:
                return mlflow.create_experiment(name, artifact_location=location and Path(location).as_uri(),
                                                tags=dict([EXPERIMENT_KIND]))
            except mlflow.exceptions.MlflowException as e:  # made first by a stage beside this one (server: no lock)
                experiment = mlflow.get_experiment_by_name(name)
                if experiment is None:
                    raise TrackingError(f"cannot create experiment '{name}' in {uri}: "
                                        f"{e.message.splitlines()[0]}") from None
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment '{name}' is deleted in {uri}: restore it "
                            f"(mlflow experiments restore) or set tracking.experiment")
    if EXPERIMENT_KIND[0] not in experiment.tags:  # made elsewhere, e.g. in the UI
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


class StageRun:
    """The MLflow run of one stage execution, opened on a thread of its own (`stage_run`) so that MLflow's imports and
    store queries overlap the stage's data loading and training. The first tracking call of the main thread that
    needs the run waits for it and makes it the active run there; calls that only add to it (`log_splits`, the
    scikit-learn model) go to the opening thread, in order, and never wait: the run ends once they are done."""

    def __init__(self, stage: str, cfg: Config):
        self.cfg = cfg
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tracking-{stage}")
        self._opened = self._pool.submit(_open_stage_run, stage, cfg)
        self._jobs: list[futures.Future] = []
        self._ids: tuple[str, str] | None = None  # (execution run, stage run) once opened
        self.active_here = False  # the main thread's active run

    @property
    def opening(self) -> bool:
        return self._ids is None

    @property
    def id(self) -> str:
        """The run's id (waits for the run to be opened)."""
        return self.wait()[1]

    def submit(self, job, *args) -> None:
        """`job(*args)` on the opening thread, where the run is active, after everything submitted before it; skipped
        if the run did not open (MLflow's fluent calls would otherwise start a run of their own)."""
        self._jobs.append(self._pool.submit(self._if_opened, job, *args))

    def _if_opened(self, job, *args) -> None:
        if self._opened.exception() is None:  # done: it ran first on this thread
            job(*args)

    def wait(self) -> tuple[str, str]:
        """(execution run id, stage run id) once the run is open; raises what the opening raised (an unusable store:
        `TrackingError`)."""
        if self._ids is None:
            self._ids = self._opened.result()
        return self._ids

    def finish(self) -> BaseException | None:
        """Every submitted job done and the thread stopped: the first failed job's error, if any."""
        self._pool.shutdown(wait=True)
        return next((e for job in self._jobs if (e := job.exception()) is not None), None)

    def activate(self) -> None:
        """Make the run the active run of this (the main) thread, with system metrics if configured."""
        run_id = self.wait()[1]
        mlflow.set_system_metrics_sampling_interval(self.cfg.tracking.system_metrics_interval_s)
        mlflow.start_run(run_id=run_id, log_system_metrics=self.cfg.tracking.system_metrics)
        self.active_here = True


_stage_run: StageRun | None = None  # the stage run of this process, while it is open


def _beside_the_stage(job, *args) -> None:
    """`job(*args)`, which only adds to the run: on the stage run's thread, never waiting for it; here, in the active
    run, outside a stage run (a search worker's)."""
    if _stage_run is not None:
        _stage_run.submit(job, *args)
    elif _active_run() is not None:
        job(*args)


def _active_run() -> mlflow.entities.Run | None:
    """`mlflow.active_run()`; on the main thread, the stage run too once it is open (waiting for it to open)."""
    run = _stage_run
    if run is not None and not run.active_here and threading.current_thread() is threading.main_thread():
        run.activate()
    return mlflow.active_run()


@contextlib.contextmanager
def stage_run(stage: str, cfg: Config) -> Iterator[StageRun]:
    """One MLflow run around one execution of `stage`: a child of its pipeline execution's run, tagged, with the
    stage's params (but those a search space names, which the stage logs once it knows the values it trains with:
    `tuning.record`) and the composed config. It ends FINISHED, FAILED if the stage raises, KILLED if it is
    interrupted; so does the execution's run. Runs of this machine left RUNNING by a killed process are closed first.
    The run is opened in the background (`StageRun`); an unreachable tracking server is named at once."""
    global _stage_run
    uri = store_uri(cfg.tracking)
    if uri.startswith(("http://", "https://")):
        check_server(uri)  # one line before any work; a store's other faults surface at the first tracking call
    run = _stage_run = StageRun(stage, cfg)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except INTERRUPTS:
        status = "KILLED"
        raise
    finally:
        _stage_run = None
        _close_stage_run(run, status)


def _open_stage_run(stage: str, cfg: Config) -> tuple[str, str]:
    """On the opening thread: the store, its orphans, the execution's run, then the stage's run, active on this
    thread for the jobs submitted to it, with its params and config."""
    experiment_id = connect(cfg)
    close_orphans(experiment_id)
    parent = open_execution(experiment_id, cfg)
    tags = {**run_tags(stage, cfg), "mlflow.parentRunId": parent}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags)
    deferred = space_keys(cfg)
    mlflow.log_params({k: v for k, v in stage_params(stage, cfg).items() if k not in deferred})
    mlflow.log_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), "config.yaml")
    return parent, run.info.run_id


def _close_stage_run(run: StageRun, status: str) -> None:
    """End the stage run and its execution's run with `status` once the jobs handed to the run's thread are done; a
    run that never opened, or a job that failed, raises why (the runs end FAILED), unless the stage is already failing
    (its own error is the one to see)."""
    failure = run.finish()
    try:
        parent, run_id = run.wait()
    except Exception:
        if status == "FINISHED":
            raise
        log.warning("the stage's MLflow run did not open", exc_info=True)
        return
    if failure is not None and status == "FINISHED":
        status = "FAILED"
    elif failure is not None:
        log.warning("a tracking job of the failing stage failed too", exc_info=failure)
        failure = None
    if run.active_here:
        mlflow.end_run(status)
    else:  # the stage made no tracking call on the main thread
        mlflow.MlflowClient().set_terminated(run_id, status)
    mlflow.MlflowClient().set_terminated(parent, status)
    if failure is not None:
        raise failure


@contextlib.contextmanager
def trial_run(name: str, params: dict[str, Any]) -> Iterator[str | None]:
    """A run nested in the active stage run for one tuner trial, with its stage's tags and its hyperparameters."""
    with _child_run(name, {KIND_TAG: "trial", "pipeline.trial": name}, params) as run_id:
        yield run_id


@contextlib.contextmanager
def seed_run(seed: int, fitted: bool = True) -> Iterator[str | None]:
    """A run nested in the active stage run for one seed's fit of the final model (`train.seeds`), like a tuner
    trial's. `fitted=False`: an earlier, interrupted run of the stage fitted it; this run only shows its results."""
    tags = {KIND_TAG: "seed", "pipeline.seed": str(seed), "pipeline.seed_fitted": str(fitted).lower()}
    if not fitted:
        tags["mlflow.note.content"] = (f"Seed {seed} was fitted and evaluated by an earlier run of this stage that was "
                                       "interrupted later: its history and results are replayed, not fitted again.")
    with _child_run(f"seed {seed}", tags, {"seed": seed}) as run_id:
        yield run_id


@contextlib.contextmanager
def _child_run(name: str, tags: dict[str, str], params: dict[str, Any]) -> Iterator[str | None]:
    """A run nested in the active stage run (or the one `attached` to), with the stage's tags, `tags` and `params`,
    owned by this process; nothing without a run."""
    parent = _active_run() or _attached
    if parent is None:
        yield None
        return
    tags = {**_inherited_tags(parent), PROCESS_TAG: process_key(), "mlflow.parentRunId": parent.info.run_id, **tags}
    with _run(experiment_id=parent.info.experiment_id, run_name=name, nested=True, tags=tags) as run_id:
        mlflow.log_params(params)
        yield run_id


_attached: mlflow.entities.Run | None = None


@contextlib.contextmanager
def attached(run_id: str | None, cfg: Config) -> Iterator[None]:
    """Nest this process's trial runs in another process's stage run (a search worker's, in its chief's), which
    stays that process's to end. Without a run id, nothing is logged."""
    global _attached
    if run_id:
        connect(cfg)
        _attached = mlflow.MlflowClient().get_run(run_id)
    try:
        yield
    finally:
        _attached = None


def _inherited_tags(run: mlflow.entities.Run) -> dict[str, str]:
    """What a run's children share with it: its stage, execution, DVC experiment and git state."""
    return {k: v for k, v in run.data.tags.items() if k.startswith(("pipeline.", "dvc.", "git.", "mlflow.source"))}


@contextlib.contextmanager
def _run(**start_run_args) -> Iterator[str]:
    """`mlflow.start_run` that ends the run KILLED when the process is interrupted (SIGINT, SIGTERM), FAILED when
    it raises, FINISHED otherwise (MLflow's own context manager knows no KILLED)."""
    run = mlflow.start_run(**start_run_args)
    status = "FAILED"
    try:
        yield run.info.run_id
        status = "FINISHED"
    except INTERRUPTS:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


def open_execution(experiment_id: str, cfg: Config) -> str:
    """The parent run of this pipeline execution (one `dvc repro`, `dvc exp run` or queued experiment), made by
    its first stage and found by the others; set RUNNING, owned by this process, until the stage ends."""
    client, key = mlflow.MlflowClient(), execution_id()
    with _store_lock(store_uri(cfg.tracking)):
        found = client.search_runs([experiment_id], f"tags.`pipeline.kind` = 'execution' and "
                                   f"tags.`pipeline.execution_id` = '{key}'", max_results=1)
        exp_name = os.environ.get("DVC_EXP_NAME")
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING", name=exp_name or found[0].info.run_name)
            if exp_name:  # an execution whose first stages ran outside the experiment (`pipeline.reproduce`)
                client.set_tag(run_id, "dvc.exp_name", exp_name)
        else:
            tags = {k: v for k, v in run_tags("", cfg).items() if k != "pipeline.stage"}
            name = exp_name or f"{'dvc' if _dvc_process() else 'by hand'} {key[:8]}"
            run_id = client.create_run(experiment_id, run_name=name,
                                       tags={**tags, KIND_TAG: "execution"}).info.run_id
    client.set_tag(run_id, PROCESS_TAG, process_key())
    return run_id


def execution_of_active_run() -> str | None:
    """The execution run that the active stage run belongs to."""
    run = _active_run()
    return run.data.tags.get("mlflow.parentRunId") if run else None


def log_ladder(stage: str, values: dict[str, float]) -> None:
    """A stage's validation and test accuracy on its execution's run: the ladder of one execution, in one place."""
    if parent := execution_of_active_run():
        client = mlflow.MlflowClient()
        for name, value in values.items():
            client.log_metric(parent, f"{name}/{stage}", value)


def log_reused(stage: str, source_run_id: str, values: dict[str, float], cfg: TrackingConfig) -> str | None:
    """A light run in the active run's execution for a stage that DVC skipped, linking to the run that made its
    outputs (and carrying its accuracies); None when that run is of this execution (the stage did run)."""
    parent = execution_of_active_run()
    client = mlflow.MlflowClient()
    source = stored_run(client, source_run_id)
    if parent is None or (source and source.data.tags.get("pipeline.execution_id") == execution_id()):
        return None
    tags = _inherited_tags(_active_run())
    link = run_link(source_run_id, cfg) if source else None
    note = (f"DVC skipped **{stage}** in this execution: its outputs are those of run "
            f"[{source_run_id[:8]}]({link or '#'}).")
    run = client.create_run(_active_run().info.experiment_id, run_name=f"{stage} (reused)", tags={
        **tags, "pipeline.stage": stage, KIND_TAG: "reused", "pipeline.reused_from": source_run_id,
        "mlflow.parentRunId": parent, "mlflow.note.content": note})
    for name, value in values.items():
        client.log_metric(run.info.run_id, name, value)
        client.log_metric(parent, f"{name}/{stage}", value)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def process_key() -> str:
    """This process, as host:pid:start time, so that a later run can tell whether it is still alive."""
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.3f}"


def close_orphans(experiment_id: str) -> list[str]:
    """End as KILLED the runs of this machine left RUNNING by a process that is gone (SIGKILL, power loss)."""
    client, host = mlflow.MlflowClient(), socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(PROCESS_TAG, "")
        owner_host, _, rest = owner.partition(":")
        if owner_host != host or _alive(rest):
            continue
        client.set_tag(run.info.run_id, "mlflow.note.content",
                       f"Closed as KILLED by a later run on {host}: process {rest.split(':')[0]} ended without "
                       "closing it (killed with SIGKILL, or the machine stopped).")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d run(s) left RUNNING by a killed process: %s", len(closed), ", ".join(closed))
    return closed


def _alive(pid_and_start: str) -> bool:
    pid, _, started = pid_and_start.partition(":")
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.01
    except (psutil.Error, ValueError):
        return False


def active_run_id() -> str | None:
    run = _active_run()
    return run.info.run_id if run else None


def active_experiment_id() -> str | None:
    run = _active_run()
    return run.info.experiment_id if run else None


def run_tags(stage: str, cfg: Config) -> dict[str, str]:
    """Stage, data set, profile, pipeline execution, DVC experiment and git state of this execution."""
    tags = {"pipeline.stage": stage, "pipeline.data": cfg.data.name, "pipeline.profile": cfg.profile,
            "pipeline.execution_id": execution_id(), KIND_TAG: "stage", PROCESS_TAG: process_key()}
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
    from the nearest `dvc` process this stage runs under (its pid and start time); without one, this process's."""
    return os.environ.get(EXECUTION_ID_ENV) or _own_execution_id()


@functools.cache
def _own_execution_id() -> str:
    if (process := _dvc_process()) is None:
        return uuid.uuid4().hex[:12]
    key = f"{os.uname().nodename}:{process.pid}:{process.create_time()}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _dvc_process() -> psutil.Process | None:
    """The nearest `dvc` process above this one, if any."""
    for process in psutil.Process().parents():
        with contextlib.suppress(psutil.Error):
            if _is_dvc(process.cmdline()):
                return process
    return None


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
    """Each split as an MLflow dataset input, named after the data set, with the digest of its arrays. Called as a
    stage loads its data, before its run may be open: the run's thread logs them, and the stage goes on."""
    _beside_the_stage(_log_splits, splits, source)


def _log_splits(splits: dict[str, tuple[np.ndarray, np.ndarray]], source: Path) -> None:
    run = mlflow.active_run()
    name = run.data.tags.get("pipeline.data", "data")
    for split, (x, y) in splits.items():
        with warnings.catch_warnings():  # MLflow registers two sources for local paths, and says so each time
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_numpy(x, targets=y, source=str(source.resolve() / split), name=f"{name}-{split}",
                                             digest=split_digest(x, y))
        mlflow.log_input(dataset, context={"train": "training", "val": "validation"}.get(split, split))


def split_digest(x: np.ndarray, y: np.ndarray) -> str:
    """The digest a split is logged with: of its images and labels, so equal digests mean the same examples."""
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:16]


def logged_test_digest(run: mlflow.entities.Run) -> str | None:
    """The digest of the test split a run logged as its input (`log_splits`); None if it logged none."""
    name = f"{run.data.tags.get('pipeline.data', 'data')}-test"
    return next((d.dataset.digest for d in run.inputs.dataset_inputs if d.dataset.name == name), None)


def log_epoch(logs: dict[str, float], epoch: int) -> None:
    """One epoch's train_/val_ loss and accuracy and learning rate, at step `epoch` (1 = the first). A store that
    stays busy beyond the retries costs the epoch's metrics in MLflow (a warning says so), never the fit: the
    history is in the fit's state and the stage's plots either way."""
    if _active_run() is None:
        return
    named = {k if k.startswith("val_") or k == "learning_rate" else f"train_{k}": float(v) for k, v in logs.items()}
    try:
        retry_busy(lambda: mlflow.log_metrics(named, step=epoch))
    except mlflow.exceptions.MlflowException as e:
        log.warning("epoch %d's metrics not logged to MLflow (%s); the fit goes on", epoch, e.message.splitlines()[0])


def retry_busy(write, attempts: int = 6, first_wait_s: float = 1.0):
    """`write()`, tried again with doubling waits while the store answers "temporarily unavailable" (SQLite: another
    process holds the database lock beyond MLflow's own 20 s busy timeout, as under `dvc queue start -j 2`)."""
    for attempt in range(attempts):
        try:
            return write()
        except mlflow.exceptions.MlflowException as e:
            if e.error_code != "TEMPORARILY_UNAVAILABLE" or attempt == attempts - 1:
                raise
            wait = first_wait_s * 2**attempt
            log.warning("tracking store busy (%s): trying again in %.0f s", e.message.splitlines()[0][:120], wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def log_results(metrics: dict[str, Any], per_class: dict[str, dict[str, float]], plots: Path) -> None:
    """Test metrics, per-class precision/recall/F1, figures and tables of plots/<stage>/ (under analysis/)."""
    if _active_run() is None:
        return
    values = {f"test_{k}": v for k, v in metrics["test"].items()}
    values.update({k: v for k, v in metrics.items() if k != "test" and isinstance(v, int | float)})
    values["best_val_accuracy"] = values.pop("val_accuracy")
    for name, scores in per_class.items():
        safe = re.sub(r"[^\w\-. ]", "_", name)
        values.update({f"test_{m}/{safe}": scores[m] for m in ("precision", "recall", "f1")})
    mlflow.log_metrics(values)
    log_ladder(_active_run().data.tags.get("pipeline.stage", "stage"),
               {"val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test"]["accuracy"]})
    mlflow.log_artifacts(str(plots), "analysis")
    image = plots / "confusion_matrix.png"
    if image.is_file():  # as an image too: the UI's chart view shows the selected runs' matrices side by side
        mlflow.log_image(np.asarray(Image.open(image).convert("RGB")), key="confusion_matrix", step=0,
                         synchronous=True)  # unset, MLflow starts its async queue, whose shutdown waits 1 s


def log_keras_model(model, example: np.ndarray) -> None:
    """The Keras model, with its signature and an input example, as the run's logged model."""
    if _active_run() is None:
        return
    import keras  # the caller's: only Keras stages get here

    backend = keras.backend.backend()
    requirements = [f"keras=={keras.__version__}", f"{backend}=={importlib.metadata.version(backend)}"]
    # mlflow#16183: the Keras flavour writes the input example before it makes the model's directory
    flavor = types.SimpleNamespace(__name__="mlflow.keras", save_model=_save_keras_model)
    signature = mlflow.models.infer_signature(example, model.predict(example, verbose=0))
    mlflow.models.Model.log(artifact_path=None, name="model", flavor=flavor, model=model, input_example=example,
                            signature=signature, pip_requirements=requirements)


def log_sklearn_model(model, example: np.ndarray) -> None:
    """The scikit-learn model (skops format), with its signature and an input example; on the stage run's own thread,
    which imports the flavour and writes the model while the stage goes on (the run ends once it is logged)."""
    _beside_the_stage(_log_sklearn_model, model, example)


def _log_sklearn_model(model, example: np.ndarray) -> None:
    mlflow.sklearn.log_model(model, name="model", input_example=example, pyfunc_predict_fn="predict_proba",
                             signature=mlflow.models.infer_signature(example, model.predict_proba(example)),
                             pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True))


def log_summary(values: dict[str, float], report: Path, tags: dict[str, str]) -> None:
    """The report stage's numbers, its markdown report and tags (the best stage and run), the tags also on the
    execution's run."""
    if _active_run() is None:
        return
    mlflow.log_metrics(values)
    mlflow.log_artifact(str(report))
    mlflow.set_tags(tags)
    if parent := execution_of_active_run():
        for key, value in tags.items():
            mlflow.MlflowClient().set_tag(parent, key, value)


def stored_run(client: mlflow.MlflowClient, run_id: str) -> mlflow.entities.Run | None:
    """The run, or None if this store does not hold it (a stage's outputs restored from DVC's cache may name a run
    of another clone's store)."""
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def register_champion(run_id: str, model_name: str, val_accuracy: float) -> str | None:
    """Register the run's logged model as a version of `model_name` (one registered model per data set) and move
    the alias `champion` to it if it beats the champion's validation accuracy on the same validation split. Return
    the champion's version; None without an active run, or if this store does not hold the run (the stage's outputs
    came from DVC's cache, made in a clone that tracked to another store)."""
    if _active_run() is None:
        return None
    client = mlflow.MlflowClient()
    if (run := stored_run(client, run_id)) is None:
        log.warning("run %s is not in this store (its stage's outputs came from DVC's cache, made where another "
                    "store was used): its model is not registered", run_id)
        return None
    models = [output.model_id for output in (run.outputs.model_outputs if run.outputs else [])]
    if not models:
        log.warning("run %s logged no model: nothing to register", run_id)
        return None
    val_digest = next((d.dataset.digest for d in run.inputs.dataset_inputs if d.dataset.name.endswith("-val")), "")
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # made by the first registration only
        client.create_registered_model(model_name, description="The best stage of each pipeline execution, chosen "
                                       "on the validation split; alias `champion` marks the best so far.")
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    version = versions[0] if versions else client.create_model_version(  # a server insists on the model's id too
        model_name, f"models:/{models[-1]}", run_id=run_id, model_id=models[-1], tags={
            "val_accuracy": f"{val_accuracy:.6f}", "val_digest": val_digest,
            "stage": run.data.tags.get("pipeline.stage", ""), "pipeline.execution_id": execution_id()})
    try:
        champion = client.get_model_version_by_alias(model_name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is None or (champion.tags.get("val_digest") == val_digest
                            and float(champion.tags.get("val_accuracy", "-1")) < val_accuracy):
        client.set_registered_model_alias(model_name, "champion", version.version)
        log.info("%s version %s (run %s, val accuracy %.4f) is the champion", model_name, version.version,
                 run_id[:8], val_accuracy)
        return str(version.version)
    if champion.tags.get("val_digest") != val_digest:
        log.info("%s: champion (version %s) was chosen on another validation split; kept. Move it by hand: "
                 "MlflowClient().set_registered_model_alias(%r, 'champion', %s)", model_name, champion.version,
                 model_name, version.version)
    return str(champion.version)


def run_link(run_id: str, cfg: TrackingConfig) -> str | None:
    """The run's page in the UI (`make ui`, or the tracking server); None if the store does not know it."""
    if (run := stored_run(mlflow.MlflowClient(), run_id)) is None:
        return None
    experiment_id = run.info.experiment_id
    uri = store_uri(cfg)
    base = uri if uri.startswith(("http://", "https://")) else f"http://{cfg.ui_host}:{cfg.ui_port}"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def find_run(ref: str, experiment_id: str) -> mlflow.entities.Run:
    """A run by id; by a stage's name, the run that made the workspace's outputs (`metrics/<stage>.json` names it)
    where this store holds it, else the stage's latest finished stage run: a stage run only, as tuner trials,
    reused-stage and comparison runs carry the stage's tag too or come later."""
    client = mlflow.MlflowClient()
    if RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref)
        except mlflow.exceptions.MlflowException:
            raise TrackingError(f"no run {ref} in {mlflow.get_tracking_uri()}") from None
    if not re.fullmatch(r"\w+", ref):
        raise TrackingError(f"'{ref}' is neither a run id (32 hex digits) nor a stage name")
    stage_runs = (f"tags.`pipeline.stage` = '{ref}' and tags.`{KIND_TAG}` = 'stage' "
                  "and attributes.status = 'FINISHED'")
    workspace = _workspace_run_id(ref)
    runs = workspace and client.search_runs([experiment_id], f"{stage_runs} and attributes.run_id = '{workspace}'")
    runs = runs or client.search_runs([experiment_id], stage_runs, order_by=["attributes.start_time DESC"],
                                      max_results=1)
    if not runs:
        raise TrackingError(f"'{ref}' is neither a run id nor a stage with a finished stage run in "
                            f"{mlflow.get_tracking_uri()}")
    return runs[0]


def _workspace_run_id(stage: str) -> str | None:
    """The run id in the workspace's `metrics/<stage>.json`, if it has one: a later experiment (`--temp`, queued) may
    have logged newer runs of the stage into the same store."""
    try:
        run_id = json.loads((METRICS_DIR / f"{stage}.json").read_text(encoding="utf-8")).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and RUN_ID.fullmatch(run_id) else None


def log_comparison(experiment_id: str, name: str, tags: dict[str, str], metrics: dict[str, float],
                   files: list[Path]) -> str:
    """A top-level run of kind `compare` holding a comparison's numbers and files, so the UI shows it; its id."""
    with _run(experiment_id=experiment_id, run_name=name, tags={**tags, KIND_TAG: "compare"}) as run_id:
        mlflow.log_metrics(metrics)
        for path in files:
            mlflow.log_artifact(str(path))
    return run_id


def download(run_id: str, path: str, dest: Path) -> Path:
    """One artifact of a run, copied into `dest`; without MLflow's progress bar (unless the user sets
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR), which would break up the tables of compare and reproduce."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dest)))
    except (mlflow.exceptions.MlflowException, OSError):
        raise TrackingError(f"run {run_id} has no artifact {path}") from None


def tag_run(run_id: str, tags: dict[str, str]) -> mlflow.entities.Run:
    """Tag a finished run of the current store (e.g. a reproduction with the run it reproduces); the run, tagged.
    A run the store does not hold is an error: it was logged elsewhere."""
    client = mlflow.MlflowClient()
    try:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"no run {run_id} in {mlflow.get_tracking_uri()}") from None


def server_environment() -> dict[str, str]:
    """The environment of an `mlflow server` or `mlflow ui` this project starts: without MLflow's GenAI job runners
    (evaluation, scorers, prompt optimisation): eight more processes, about 20 CPU-seconds at each start, taken from
    training on a small machine. Set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have them."""
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


def ui_command(cfg: TrackingConfig) -> list[str] | None:
    """`mlflow ui` against the configured store (None for a tracking server, which is its own UI)."""
    uri = store_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return None
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", cfg.ui_host,
               "--port", str(cfg.ui_port), "--workers", "1"]  # one person's UI: more workers only slow its start
    root = artifact_root(uri)
    return command + (["--default-artifact-root", root] if root else [])


def _save_keras_model(path: str, **kwargs) -> None:
    os.makedirs(path)
    mlflow.keras.save_model(path=path, **kwargs)


def check_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise TrackingError(f"tracking server {uri} is not reachable ({reason}): start it, or use "
                            f"tracking=local") from None


def client(uri: str) -> mlflow.MlflowClient:
    """A client of the store at `uri`. Opening a new SQLite store makes its tables: done under the lock the stages
    take, since two processes making them at once fail (alembic: "expected to match one row")."""
    with _store_lock(uri):
        return mlflow.MlflowClient(uri)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a SQLite store (concurrent stages of `dvc queue start -j 2` would both create
    its tables) and the making of an execution's run. A server serialises its own."""
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


def log_params(values: dict[str, Any]) -> None:
    """Params the stage knows only once it runs (such as the epochs its budget came to), on the active run."""
    if _active_run() is not None:
        retry_busy(lambda: mlflow.log_params(values))


def log_trained_params(values: dict[str, Any], source: str) -> None:
    """The values a stage trains with for its searched settings, as its params, and their source as a tag."""
    if _active_run() is not None:
        mlflow.log_params(values)
        mlflow.set_tag("pipeline.params_source", source)


def log_trial_score(score: float) -> None:
    """A tuner trial's score (its best objective value), on the active trial run."""
    if _active_run() is not None:
        mlflow.log_metric("score", score)


def log_seed_result(val_accuracy: float, test_accuracy: float) -> None:
    """One seed's best-epoch validation accuracy and its final model's test accuracy, on the active seed run (named
    as on stage runs: `val_accuracy` is the per-epoch series there)."""
    if _active_run() is not None:
        mlflow.log_metrics({"best_val_accuracy": val_accuracy, "test_accuracy": test_accuracy})


def log_seed_spread(spread: dict[str, Any]) -> None:
    """The seeds' mean and sample std of val and test accuracy, and their count, on the active stage run."""
    if _active_run() is not None:
        values = {f"seeds_{split}_{stat}": spread[split][stat] for split in ("val_accuracy", "test_accuracy")
                  for stat in ("mean", "std")}
        mlflow.log_metrics({**values, "seeds_count": len(spread["values"])})


def log_artifacts(directory: Path, artifact_path: str) -> None:
    """A directory of files into the active run, under `artifact_path`."""
    if _active_run() is not None:
        mlflow.log_artifacts(str(directory), artifact_path)


def log_importance(shares: dict[str, float], note: str) -> None:
    """A search's hyperparameter importance shares as metrics `importance/<name>` and its note (how far to trust
    them) as tag `search.importance_note`, on the active stage run."""
    if _active_run() is not None:
        mlflow.log_metrics({f"importance/{name}": share for name, share in shares.items()})
        mlflow.set_tag("search.importance_note", note)
