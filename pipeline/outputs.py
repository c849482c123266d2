"""What every model stage leaves behind: metrics/<stage>.json, plots/<stage>/ and models/<stage>/."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation import evaluate
from pipeline.files import atomic_path, write_json
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
                        val_accuracy: float, fit_seconds: float, parameters: int, images_per_second: float,
                        history: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """Write metrics/<stage>.json and plots/<stage>/ (curves and confusion CSVs); return the metrics."""
    metrics: dict[str, Any] = {"test": evaluate(y_true, y_prob), "val_accuracy": val_accuracy}
    if history:
        metrics["epochs"] = len(history)
    metrics.update(fit_seconds=round(fit_seconds, 2), parameters=int(parameters),
                   inference_images_per_second=round(images_per_second, 1))
    plots = PLOTS_DIR / stage
    with atomic_path(plots, directory=True) as tmp:
        if history:
            _write_csv(tmp / "history.csv", [{**row, "epoch": i + 1} for i, row in enumerate(history)])
        predicted = y_prob.argmax(axis=1)
        _write_csv(tmp / "confusion.csv", [{"actual": classes[a], "predicted": classes[p]}
                                           for a, p in zip(y_true, predicted, strict=True)])
    write_json(METRICS_DIR / f"{stage}.json", metrics)
    return metrics


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_keras_model(stage: str, model) -> Path:
    """models/<stage>/model.keras, written atomically."""
    path = model_dir(stage) / "model.keras"
    with atomic_path(path) as tmp:
        model.save(tmp)
    return path
