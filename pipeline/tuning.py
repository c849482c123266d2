"""keras-tuner searches over the spaces declared in YAML beside each stage's settings (`pipeline.search_space`).

`pipeline.search_space` checks a space (at config load, before any trial); `define` turns it into hp.Int /
hp.Float / hp.Choice; `tune` runs the tuner of `conf/tuner` on a training subset, logs every trial as a nested MLflow
run, writes models/<stage>/best_hparams.json, the trials table and their hyperparameter importance
(`pipeline.importance`), and returns the section with the best values, which the stage then trains on the full
training split. Tuner state lives in the stage's work dir, keyed by everything that defines the search: a killed
search resumes its finished trials, and a changed space, tuner or data starts afresh.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import search_workers, tracking
from pipeline.data.split import Arrays
from pipeline.deps import code_digest
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, write_json
from pipeline.importance import hyperparameter_importance
from pipeline.paths import model_dir, work_dir
from pipeline.schema import TunerConfig
from pipeline.search_space import Param, parse_space, trained_values, tunable_names

log = logging.getLogger(__name__)

BEST_FILE = "best_hparams.json"


def define(hp, params: list[Param]) -> dict[str, Any]:
    """Declare `params` on a keras-tuner HyperParameters; return the active values (conditional ones only
    where their parent has one of the listed values)."""
    values: dict[str, Any] = {}
    for p in params:
        if p.when is None:
            values[p.name] = _declare(hp, p)
        else:
            with hp.conditional_scope(*p.when):
                value = _declare(hp, p)
            if values.get(p.when[0]) in p.when[1]:
                values[p.name] = value
    return values


def _declare(hp, p: Param):
    if p.kind == "choice":
        return hp.Choice(p.name, list(p.values))
    if p.kind == "int":
        return hp.Int(p.name, p.values[0], p.values[1], step=int(p.step or 1), sampling="log" if p.log else "linear")
    return hp.Float(p.name, float(p.values[0]), float(p.values[1]), step=p.step, sampling="log" if p.log else "linear")


def record(key: str, section: Any, source: str) -> dict[str, Any]:
    """Log the values `section` trains with for its space's settings as the stage run's params, and where they
    came from (`search` or `config`); return them."""
    values = trained_values(key, section)
    tracking.log_trained_params(values, source)
    return values


def apply(section: Any, values: dict[str, Any]) -> Any:
    """The section with `values` set, each on the section itself or on its `train` budget."""
    own = {f.name for f in dataclasses.fields(section)}
    train = dataclasses.replace(section.train, **{k: v for k, v in values.items() if k not in own})
    return dataclasses.replace(section, **{k: v for k, v in values.items() if k in own}, train=train)


def read_best(stage: str) -> dict[str, Any]:
    """models/<stage>/best_hparams.json: the searched `values` (none when that stage did not search), their
    `source` and the values it `trained` with."""
    path = model_dir(stage) / BEST_FILE
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the {stage} stage first (dvc repro {stage})")
    return json.loads(path.read_text())


def tune(stage: str, section: Any, build: Callable[[Any], Any], train: Arrays, val: Arrays, tuner_cfg: TunerConfig,
         seed: int) -> Any:
    """Search `section.search.space` (if enabled) and write models/<stage>/best_hparams.json; return the section
    with the best values. `build(section)` makes an uncompiled model for a candidate's settings."""
    best: dict[str, Any] = {"values": {}, "source": "config"}
    if section.search.enabled:
        params = parse_space(section.search.space, f"{stage}.search.space", tunable_names(section))
        best = _search(stage, section, params, build, train, val, tuner_cfg, seed)
    chosen = apply(section, best["values"])
    write_json(model_dir(stage) / BEST_FILE, {**best, "trained": record(stage, chosen, best["source"])})
    return chosen


def _search(stage, section, params, build, train, val, tuner_cfg, seed) -> dict[str, Any]:
    import keras
    import keras_tuner

    from pipeline.training import TrackEpochs, built_in, compile_model, one_hot, progress, step_schedule

    growing = tuner_cfg.subset_mode == "growing" and tuner_cfg.subset is not None
    x, y = train if growing else _subset(train, tuner_cfg.subset, seed)
    order = np.random.default_rng(seed).permutation(len(y)) if growing else None
    objective = keras_tuner.Objective(tuner_cfg.objective, "min" if tuner_cfg.objective.endswith("loss") else "max")
    section = trial_budget(section, tuner_cfg)

    class HyperModel(keras_tuner.HyperModel):
        def build(self, hp):
            candidate = apply(section, define(hp, params))
            return built_in(candidate.train.precision, lambda: build(candidate))

        def fit(self, hp, model, x, y, validation_data, **kwargs):
            """Compiled here, for the epochs this round trains: a Hyperband round that continues a promoted trial's
            weights gets a whole schedule of its own (warm-up, then cosine to zero), so every score is read at the
            end of an annealed schedule."""
            candidate, n_classes = apply(section, define(hp, params)), model.output_shape[-1]
            first, batch = kwargs.get("initial_epoch", 0), candidate.train.batch_size
            rounds = dataclasses.replace(candidate.train, epochs=kwargs["epochs"] - first)
            per_epoch = len(y)
            if growing:  # one iterator across the epochs (`steps_per_epoch`): epoch k trains on chunk k
                kwargs["steps_per_epoch"] = max(1, round(tuner_cfg.subset / batch))
                per_epoch = kwargs["steps_per_epoch"] * batch
                x, y = epoch_chunks((x, y), order, per_epoch, first, kwargs["epochs"])
            steps = -(-per_epoch // batch)
            compile_model(model, rounds, steps)
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), *step_schedule(rounds, steps)]
            return model.fit(*one_hot((x, y), n_classes), validation_data=one_hot(validation_data, n_classes),
                             batch_size=batch, **kwargs)

    key = _search_key(stage, section, tuner_cfg, seed, x, y, *val)
    directory = work_dir(stage) / "search"
    for old in directory.glob("*") if directory.is_dir() else []:
        if old.name != key:
            log.info("%s: a search of other settings is in %s: starting afresh", stage, old)
            shutil.rmtree(old)
    common = dict(hypermodel=HyperModel(), objective=objective, seed=seed, directory=str(directory),
                  project_name=key, overwrite=False, executions_per_trial=tuner_cfg.executions_per_trial,
                  max_consecutive_failed_trials=tuner_cfg.max_trials)
    with search_workers.chief(stage, tuner_cfg.workers):  # trials in worker processes, if any; the tuner's
        if tuner_cfg.kind == "hyperband":                  # role is read from the environment as it is made
            tuner = _tracked(keras_tuner.Hyperband)(max_epochs=tuner_cfg.epochs, factor=tuner_cfg.hyperband_factor,
                                                    **common)
        else:
            base = keras_tuner.RandomSearch if tuner_cfg.kind == "random" else keras_tuner.BayesianOptimization
            tuner = _tracked(base)(max_trials=tuner_cfg.max_trials, **common)
        tuner.search(x, y, validation_data=val, epochs=tuner_cfg.epochs, verbose=progress(), callbacks=[
            keras.callbacks.EarlyStopping(monitor=tuner_cfg.objective, mode=objective.direction,
                                          patience=tuner_cfg.patience),
            TrackEpochs()])
    if search_workers.worker_id():
        raise SystemExit(0)  # a worker's part ends with the search; the chief trains the final model
    rows = _trials_table(tuner, params, objective.direction)
    if failed := [r for r in rows if r["status"] != "COMPLETED"]:
        raise PipelineError(f"{stage}: {len(failed)} of {len(rows)} tuner trials did not complete (trial "
                            f"{failed[0]['trial']}: {failed[0]['status']} {failed[0]['message']}); see the log above")
    _write_trials(stage, rows, params, tuner_cfg.objective, objective.direction, seed)
    values = {p.name: rows[0][p.name] for p in params if rows[0][p.name] != ""}  # applied to the final budget
    log.info("%s: best of %d trials, %s %.4f: %s", stage, len(rows), tuner_cfg.objective, rows[0]["score"], values)
    return {"values": values, "source": "search", "objective": tuner_cfg.objective, "score": rows[0]["score"],
            "trials": len(rows), "tuner": tuner_cfg.kind}


def trial_budget(section: Any, tuner_cfg: TunerConfig) -> Any:
    """The section as a trial trains it: the tuner's epochs and patience and none of the final fit's budget, so that
    the search, and its saved state, do not depend on the final fit's epochs, `min_images`, patience or seeds."""
    train = dataclasses.replace(section.train, epochs=tuner_cfg.epochs, min_images=None, patience=tuner_cfg.patience,
                                seeds=[])
    return dataclasses.replace(section, train=train)


def _tracked(base):
    """`base` tuner whose every trial is a nested MLflow run with its hyperparameters, epochs and score."""

    class Tracked(base):
        def run_trial(self, trial, *args, **kwargs):
            values = {k: v for k, v in trial.hyperparameters.values.items() if trial.hyperparameters.is_active(k)}
            with tracking.trial_run(f"trial {trial.trial_id}", values):
                results = super().run_trial(trial, *args, **kwargs)
                histories = results if isinstance(results, list) else [results]
                name, direction = self.oracle.objective.name, self.oracle.objective.direction
                best = [(min if direction == "min" else max)(h.history[name]) for h in histories]
                tracking.log_trial_score(float(np.mean(best)))
            return results

    Tracked.__name__ = f"Tracked{base.__name__}"
    return Tracked


def _subset(train: Arrays, size: int | None, seed: int) -> Arrays:
    """A stratified subset of `size` training examples (all when null or larger), so trials stay cheap."""
    x, y = train
    if size is None or size >= len(y):
        return x, y
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(y)), train_size=size, stratify=y, random_state=seed)
    keep = np.sort(keep)
    return x[keep], y[keep]


def epoch_chunks(train: Arrays, order: np.ndarray, chunk: int, first: int, end: int) -> Arrays:
    """Epochs `first`..`end - 1` of a growing-subset trial: epoch k trains on images [k*chunk, (k+1)*chunk) of
    `order` (wrapping round the split), so that a candidate promoted to more epochs sees more distinct images, and
    one that continues (Hyperband's next round) goes on where its last round stopped."""
    x, y = train
    keep = order[np.arange(first * chunk, end * chunk) % len(order)]
    return x[keep], y[keep]


def _search_key(stage, section, tuner_cfg, seed, *arrays) -> str:
    """A digest of everything that defines a search (the stage's code included), so that changed settings, or
    trials scored by older code, never mix with new trials."""
    tuner = dataclasses.replace(tuner_cfg, workers=0)  # how many processes run the trials does not define them
    digest = hashlib.sha256(json.dumps([stage, code_digest(stage), dataclasses.asdict(section),
                                        dataclasses.asdict(tuner), seed], sort_keys=True, default=str).encode())
    for a in arrays:
        digest.update(np.ascontiguousarray(a).data)
    return digest.hexdigest()[:16]


def _trials_table(tuner, params: list[Param], direction: str) -> list[dict[str, Any]]:
    rows = []
    for trial in tuner.oracle.trials.values():
        hp = trial.hyperparameters
        lines = (trial.message or "").strip().splitlines()
        row = {"trial": trial.trial_id, "status": str(trial.status), "score": trial.score,
               "epochs": hp.values.get("tuner/epochs", ""), "message": lines[-1] if lines else ""}
        row.update({p.name: hp.values[p.name] if p.name in hp.values and hp.is_active(p.name) else ""
                    for p in params})
        rows.append(row)
    worst = float("inf") if direction == "min" else float("-inf")
    return sorted(rows, key=lambda r: worst if r["score"] is None else r["score"], reverse=direction == "max")


def _write_trials(stage: str, rows: list[dict[str, Any]], params: list[Param], objective: str, direction: str,
                  seed: int) -> None:
    """models/<stage>/search/trials.csv (sorted best first), importance.csv (`pipeline.importance`) and trials.png, a
    panel per hyperparameter of score against value beside the importance; all logged to the stage run, with the
    importance shares as metrics and how far to trust them as a tag."""
    importance = hyperparameter_importance(last_rounds(rows, params), params, direction, seed)
    log.info("%s: hyperparameter importance %s (%s)", stage,
             {k: round(v, 3) for k, v in importance["share"].items()}, importance["note"])
    out = model_dir(stage) / "search"
    with atomic_path(out, directory=True) as tmp:
        with (tmp / "trials.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["trial", "score", "status", "epochs", *[p.name for p in params]],
                                    extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        _write_importance(tmp / "importance.csv", importance)
        _plot_trials(tmp / "trials.png", rows, params, objective, importance)
    tracking.log_artifacts(out, "search")
    tracking.log_importance(importance["share"], importance["note"])


def last_rounds(rows: list[dict[str, Any]], params: list[Param]) -> list[dict[str, Any]]:
    """One row per candidate: Hyperband trains a promoted candidate again as a new trial with more epochs, and only
    its last round's score says what the candidate reached (the importance would otherwise count it more than once,
    at different budgets). Other tuners' rows are returned as they are."""
    last: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        candidate = tuple(str(row[p.name]) for p in params)
        if candidate not in last or (row["epochs"] or 0) > (last[candidate]["epochs"] or 0):
            last[candidate] = row
    return list(last.values()) if any(row["epochs"] != "" for row in rows) else rows


def _write_importance(path: Path, importance: dict[str, Any]) -> None:
    """One row per hyperparameter, most important first; only the header when none was computed."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["hyperparameter", "importance", "mean", "std"])
        for name in sorted(importance["share"], key=importance["share"].get, reverse=True):
            writer.writerow([name, importance["share"][name], importance["mean"][name], importance["std"][name]])


def _plot_trials(path: Path, rows: list[dict[str, Any]], params: list[Param], objective: str,
                 importance: dict[str, Any]) -> None:
    """Score against each hyperparameter (shared y axis), then the importance bars; the note in the title when the
    importance is not to be trusted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.analysis import save_figure

    width = 3.2 * (len(params) + 1)
    fig, axes = plt.subplots(1, len(params) + 1, figsize=(width, 3.4), squeeze=False)
    for ax, p in zip(axes[0][:-1], params, strict=True):
        if ax is not axes[0][0]:
            ax.sharey(axes[0][0])
            ax.tick_params(labelleft=False)
        points = [(r[p.name], r["score"]) for r in rows if r[p.name] != "" and r["score"] is not None]
        if p.kind == "choice":
            labels = [str(v) for v in p.values]
            ax.scatter([labels.index(str(v)) for v, _ in points], [s for _, s in points])
            ax.set_xticks(range(len(labels)), labels)
        else:
            ax.scatter([v for v, _ in points], [s for _, s in points])
            if p.log:
                ax.set_xscale("log")
        ax.set_xlabel(p.name)
    axes[0][0].set_ylabel(objective)
    _plot_importance(axes[0][-1], params, importance)
    title = f"{len(rows)} trials" + ("" if importance["trustworthy"] else f": {importance['note']}")
    fig.suptitle(textwrap.fill(title, width=int(12 * width)), fontsize=10)  # about 12 characters an inch
    save_figure(fig, path)


def _plot_importance(ax, params: list[Param], importance: dict[str, Any]) -> None:
    """Horizontal bars of each hyperparameter's share, first at the top, with the spread over repeats."""
    names = [p.name for p in params][::-1]
    ax.set_title("importance", fontsize=10)
    ax.set_xlim(0, 1)
    if not importance["share"]:
        ax.text(0.5, 0.5, "none computed", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    total = sum(max(m, 0.0) for m in importance["mean"].values()) or 1.0
    ax.barh(names, [importance["share"][n] for n in names], xerr=[importance["std"][n] / total for n in names],
            color="tab:green" if importance["trustworthy"] else "tab:gray")
    ax.set_xlabel("share")
