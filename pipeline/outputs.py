"""What every model stage leaves behind: metrics/<stage>.json, plots/<stage>/ and models/<stage>/, each also
logged to the stage's MLflow run."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from pipeline import tracking
from pipeline.analysis import plot_history, write_analysis, write_predictions
from pipeline.errors import DataError
from pipeline.evaluation import evaluate, per_class
from pipeline.files import atomic_path, file_digest, write_json
from pipeline.paths import METRICS_DIR, PLOTS_DIR, model_dir


def fingerprint(*parts: Any) -> str:
    """A short digest of settings (dataclasses, dicts, numbers), to key resumable state."""
    plain = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def predict_timed(predict, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Class probabilities for `x`, and the throughput in images per second."""
    start = time.perf_counter()
    y_prob = np.asarray(predict(x), dtype=np.float64)
    seconds = time.perf_counter() - start
    return y_prob / y_prob.sum(axis=1, keepdims=True), len(x) / max(seconds, 1e-9)  # float32 rows sum to 1 +- 1e-7


def write_stage_outputs(stage: str, y_true: np.ndarray, y_prob: np.ndarray, classes: list[str], *,
                        images: np.ndarray, val_accuracy: float, fit_seconds: float, parameters: int,
                        images_per_second: float, history: list[dict[str, float]] | None = None,
                        best_epoch: int | None = None,
                        explain: Callable[[Path, np.ndarray], None] | None = None,
                        hparams: dict[str, Any] | None = None, seeds: dict[str, Any] | None = None,
                        extra: dict[str, float] | None = None) -> dict[str, Any]:
    """Write metrics/<stage>.json and plots/<stage>/ (curves, confusion CSVs, every test prediction, the confusion
    analysis of `pipeline.analysis`, and what `explain` draws of the worst misclassified test images); log them to the
    stage's MLflow run, whose id the metrics name. `best_epoch`: the index in `history` of the weights kept; `seeds`:
    the spread over `train.seeds`, when the final model was trained more than once (the model written is the first
    seed's); `extra`: further metrics, such as those of test-time augmentation. Return the metrics."""
    # key order is `dvc exp show`'s column order: validation, then test accuracy first
    metrics: dict[str, Any] = {"val_accuracy": val_accuracy, "test": evaluate(y_true, y_prob), **(extra or {})}
    if history:
        metrics["epochs"] = len(history)
    if best_epoch is not None:
        metrics["best_epoch"] = best_epoch + 1  # numbered as in history.csv: the epoch whose weights are kept
    metrics.update(fit_seconds=round(fit_seconds, 2), parameters=int(parameters),
                   inference_images_per_second=round(images_per_second, 1))
    if hparams:  # the values the model trained with for its searched settings: `dvc exp show` lists them
        metrics["hparams"] = hparams
    if seeds:
        metrics["seeds"] = seeds
    if run_id := tracking.active_run_id():
        metrics["mlflow_run_id"] = run_id
    plots = PLOTS_DIR / stage
    with atomic_path(plots, directory=True) as tmp:
        if history:
            _write_csv(tmp / "history.csv", [{**row, "epoch": i + 1} for i, row in enumerate(history)])
            plot_history(tmp / "training_curves.png", history)
        predicted = y_prob.argmax(axis=1)
        _write_csv(tmp / "confusion.csv", [{"actual": classes[a], "predicted": classes[p]}
                                           for a, p in zip(y_true, predicted, strict=True)])
        write_predictions(tmp / "test_predictions.csv", y_true, y_prob, classes)  # for pipeline.compare
        worst = write_analysis(tmp, y_true, y_prob, images, classes)
        if explain is not None:
            explain(tmp, worst)
    write_json(METRICS_DIR / f"{stage}.json", metrics)
    tracking.log_results(metrics, per_class(y_true, y_prob, classes), plots)
    return metrics


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_keras_model(stage: str, model, example: np.ndarray) -> Path:
    """models/<stage>/model.keras, written atomically; logged with `example` as its input example."""
    path = model_dir(stage) / "model.keras"
    with atomic_path(path) as tmp:
        model.save(tmp)
    tracking.log_keras_model(model, example)
    return path


def save_sklearn_model(stage: str, model, example: np.ndarray) -> Path:
    """models/<stage>/model.joblib, written atomically; logged with `example` as its input example."""
    path = model_dir(stage) / "model.joblib"
    with atomic_path(path) as tmp:
        joblib.dump(model, tmp)
    tracking.log_sklearn_model(model, example)
    return path


def stage_model_file(stage: str, needed_by: str) -> Path:
    """models/<stage>/model.keras, for a stage that starts from it; a clear error if it is missing."""
    path = model_dir(stage) / "model.keras"
    if not path.is_file():
        raise DataError(f"{path} not found: {needed_by} starts from the {stage} stage's model (dvc repro {stage})")
    return path


def load_keras_model(stage: str, needed_by: str):
    """models/<stage>/model.keras (safe mode) and its digest, for a stage that starts from it."""
    import keras  # here, so that the scikit-learn stage does not pay for importing Keras

    path = stage_model_file(stage, needed_by)
    try:
        return keras.saving.load_model(path, safe_mode=True), file_digest(path)
    except ValueError as e:
        if "safe_mode" not in str(e):
            raise
        raise DataError(f"{path}: refused: it holds Python code (a Lambda layer's function) that Keras safe mode does "
                        f"not run; the pipeline's models never do, so rebuild it: dvc repro --force {stage}") from None
