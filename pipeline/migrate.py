"""`python -m pipeline.migrate [--from URI] [--to URI] [EXPERIMENT ...]` (`make migrate`): copy the runs of one MLflow
store into another, by default the project's local SQLite store into the tracking server of `tracking=server`.

It copies experiments with their tags; runs with their name, status, times, params, tags, metric histories, dataset
inputs, artifacts and parent links; MLflow 3's logged models (where a stage's model lives) with their params, tags
and artifacts, as outputs of the copied runs; registered models with their versions, tags and aliases.
mlflow-export-import 1.2.0, the last release, was tried first (docs/decisions.md): it copies params, metric histories,
tags, artifacts and parent links, but ends every run FINISHED at the time of the copy, drops dataset inputs and knows
nothing of logged models, nor of registry versions that point at them.

Every copy carries its original's id in the tag `pipeline.copy_of`, so migrating again, or after an interruption,
copies only what is missing; a run whose copy was interrupted (still RUNNING there) is deleted and copied again.
Runs still RUNNING in the source are left for a later migration.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import LoggedModelOutput, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from pipeline import config, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.migrate")

COPY_OF = "pipeline.copy_of"  # on each copy: the id of what it copies


class Copier:
    """Copies between two stores; `runs` and `models` map the source's ids to the destination's."""

    def __init__(self, source: str, destination: str) -> None:
        self.src, self.dst = tracking.client(source), tracking.client(destination)
        self.runs: dict[str, str] = {}
        self.models: dict[str, str] = {}

    def experiment(self, name: str) -> int:
        """Copy one experiment's runs and their models; return how many runs were copied now."""
        src = self.src.get_experiment_by_name(name)
        dst = self.dst.get_experiment_by_name(name)
        if dst is None:
            location = tracking.artifact_root(self.dst.tracking_uri)  # a SQLite store's beside its database
            dst_id = self.dst.create_experiment(name, artifact_location=location and Path(location).as_uri(),
                                                tags=src.tags)
        elif dst.lifecycle_stage == "deleted":
            raise PipelineError(f"experiment '{name}' is deleted in the destination: restore it first "
                                f"(mlflow experiments restore)")
        else:
            dst_id = dst.experiment_id
        self._known(dst_id)
        runs = [r for r in _all(self.src.search_runs, [src.experiment_id]) if r.info.status != "RUNNING"]
        copied = 0
        for run in _parents_first(runs):
            if run.info.run_id not in self.runs:
                self._run(run, dst_id)
                copied += 1
        return copied

    def _known(self, experiment_id: str) -> None:
        """Map what earlier migrations copied; delete the run copies they left half-done, and their models."""
        half_done = set()
        for run in _all(self.dst.search_runs, [experiment_id]):
            if COPY_OF in run.data.tags:
                if run.info.status == "RUNNING":
                    self.dst.delete_run(run.info.run_id)
                    half_done.add(run.info.run_id)
                else:
                    self.runs[run.data.tags[COPY_OF]] = run.info.run_id
        for model in _all(self.dst.search_logged_models, [experiment_id]):
            if COPY_OF in model.tags:
                if model.source_run_id in half_done:
                    self.dst.delete_logged_model(model.model_id)
                else:
                    self.models[model.tags[COPY_OF]] = model.model_id

    def _run(self, run, experiment_id: str) -> None:
        src_id = run.info.run_id
        tags = {k: v for k, v in run.data.tags.items() if k != MLFLOW_PARENT_RUN_ID}
        if (parent := self.runs.get(run.data.tags.get(MLFLOW_PARENT_RUN_ID, ""))) is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        dst_id = self.dst.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name,
                                     tags={**tags, COPY_OF: src_id}).info.run_id
        for chunk in _chunks([Param(k, v) for k, v in run.data.params.items()], MAX_PARAMS_TAGS_PER_BATCH):
            self.dst.log_batch(dst_id, params=chunk)
        history = [Metric(m.key, m.value, m.timestamp, m.step)
                   for key in run.data.metrics for m in self.src.get_metric_history(src_id, key)]
        for chunk in _chunks(history, MAX_METRICS_PER_BATCH):
            self.dst.log_batch(dst_id, metrics=chunk)
        if run.inputs and run.inputs.dataset_inputs:
            self.dst.log_inputs(dst_id, datasets=run.inputs.dataset_inputs)
        with tempfile.TemporaryDirectory() as tmp:
            if self.src.list_artifacts(src_id):
                self.dst.log_artifacts(dst_id, self.src.download_artifacts(src_id, "", tmp))
        outputs = run.outputs.model_outputs if run.outputs else []
        for output in outputs:
            self._model(output.model_id, experiment_id, dst_id)
        if outputs:
            self.dst.log_outputs(dst_id, [LoggedModelOutput(self.models[o.model_id], o.step) for o in outputs])
        self.dst.set_terminated(dst_id, run.info.status, end_time=run.info.end_time)  # the copy is complete
        self.runs[src_id] = dst_id

    def _model(self, model_id: str, experiment_id: str, run_id: str) -> None:
        """Copy a logged model, its MLmodel file saying which run and model it now belongs to."""
        if model_id in self.models:
            return
        model = self.src.get_logged_model(model_id)
        copy = self.dst.create_logged_model(experiment_id, name=model.name, source_run_id=run_id,
                                            tags={**model.tags, COPY_OF: model_id}, params=model.params,
                                            model_type=model.model_type)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp,
                                                             tracking_uri=self.src.tracking_uri))
            mlmodel = local / "MLmodel"
            if mlmodel.is_file():
                spec = yaml.safe_load(mlmodel.read_text())
                spec.update(run_id=run_id, model_id=copy.model_id)
                mlmodel.write_text(yaml.safe_dump(spec, sort_keys=False))
            self.dst.log_model_artifacts(copy.model_id, str(local))
        self.dst.finalize_logged_model(copy.model_id, model.status)
        self.models[model_id] = copy.model_id

    def registry(self) -> int:
        """Copy the versions of registered models whose runs were copied, their tags and aliases; return how many."""
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.dst.tracking_uri)  # a SQLite registry finds a version's logged model there
        try:
            return self._registry()
        finally:
            mlflow.set_tracking_uri(previous)

    def _registry(self) -> int:
        copied = 0
        for registered in _all(self.src.search_registered_models):
            versions = [v for v in _all(self.src.search_model_versions, f"name = '{registered.name}'")
                        if v.run_id in self.runs]
            if not versions:
                continue
            try:
                self.dst.create_registered_model(registered.name, tags=registered.tags,
                                                 description=registered.description)
            except MlflowException:  # an earlier migration, or the destination's own, made it
                pass
            known = {v.tags.get(COPY_OF): v.version
                     for v in _all(self.dst.search_model_versions, f"name = '{registered.name}'")}
            numbers = {}
            for version in sorted(versions, key=lambda v: int(v.version)):
                key = f"{registered.name}/{version.version}"
                if key not in known:
                    model_id = self.models.get(version.model_id or version.source.removeprefix("models:/"))
                    source = f"models:/{model_id}" if model_id else version.source.replace(version.run_id,
                                                                                          self.runs[version.run_id])
                    known[key] = self.dst.create_model_version(
                        registered.name, source, run_id=self.runs[version.run_id], model_id=model_id,
                        tags={**version.tags, COPY_OF: key}, description=version.description).version
                    copied += 1
                numbers[version.version] = known[key]
            for alias, version in registered.aliases.items():
                if version in numbers:
                    self.dst.set_registered_model_alias(registered.name, alias, numbers[version])
        return copied


def _all(search, *args, **kwargs) -> Iterable:
    """Every result of a paged MLflow search."""
    token = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _chunks(items: list, size: int) -> Iterable[list]:
    return (items[i:i + size] for i in range(0, len(items), size))


def _parents_first(runs: list) -> list:
    """Runs ordered so that a parent comes before its children (its copy's id is then known)."""
    by_id = {r.info.run_id: r for r in runs}

    def depth(run) -> int:
        parent = by_id.get(run.data.tags.get(MLFLOW_PARENT_RUN_ID, ""))
        return 0 if parent is None else 1 + depth(parent)

    return sorted(runs, key=lambda r: (depth(r), r.info.start_time))


def migrate(source: str, destination: str, experiments: Sequence[str] = ()) -> dict[str, int]:
    """Copy `experiments` (default: every active one with runs) from `source` to `destination`: {what: count}."""
    copier = Copier(source, destination)
    names = list(experiments) or [e.name for e in _all(copier.src.search_experiments)
                                  if copier.src.search_runs([e.experiment_id], max_results=1)]
    counts = {"runs": 0}
    for name in names:
        if copier.src.get_experiment_by_name(name) is None:
            raise PipelineError(f"experiment '{name}' not found in {source}")
        counts["runs"] += copier.experiment(name)
        log.info("experiment %s: %d runs in the destination", name, len(copier.runs))
    counts["model versions"] = copier.registry()
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # two lines per copied run otherwise
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", help="experiment names (default: every one with runs)")
    parser.add_argument("--from", dest="source", help="the store to copy from (default: the project's local store)")
    parser.add_argument("--to", dest="destination", help="the store to copy into (default: tracking=server's uri)")
    args = parser.parse_args(argv)
    try:
        source = args.source or tracking.store_uri(config.load(overrides=["tracking=local"]).tracking)
        destination = args.destination or tracking.store_uri(config.load(overrides=["tracking=server"]).tracking)
        if destination.startswith(("http://", "https://")):
            tracking.check_server(destination)
        counts = migrate(source, destination, args.experiments)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MlflowException as e:
        print(f"error: copying from {source} to {destination}: {e.message.splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"copied runs: {counts['runs']}, model versions: {counts['model versions']} (from {source} to "
          f"{destination})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
