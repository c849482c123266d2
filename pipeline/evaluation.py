"""Test metrics from predictions: pure functions of (y_true, y_prob), shared by every model stage."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

TOP_K = 3


def evaluate(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """Accuracy, top-k accuracy, macro F1, log loss and expected calibration error."""
    y_true = np.asarray(y_true, dtype=np.int64)
    labels = np.arange(y_prob.shape[1])
    y_pred = y_prob.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        f"top{TOP_K}_accuracy": float(top_k_accuracy_score(y_true, y_prob, k=TOP_K, labels=labels)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "log_loss": float(log_loss(y_true, y_prob, labels=labels)),
        "ece": expected_calibration_error(y_true, y_prob),
    }


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the bins' sizes."""
    confidence = y_prob.max(axis=1)
    correct = y_prob.argmax(axis=1) == np.asarray(y_true)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def per_class(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    """{class: {precision, recall, f1, support}}."""
    labels = np.arange(len(classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_prob.argmax(axis=1), labels=labels, zero_division=0)
    return {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(classes)}


def confusion(y_true: np.ndarray, y_prob: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    return confusion_matrix(y_true, y_prob.argmax(axis=1), labels=np.arange(n_classes))
