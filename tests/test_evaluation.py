"""Evaluation metrics on hand-made predictions whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation import confusion, evaluate, expected_calibration_error, per_class

Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PROB = np.array([
    [0.9, 0.05, 0.05],  # right, confident
    [0.4, 0.5, 0.1],    # wrong: 0 taken for 1
    [0.1, 0.8, 0.1],    # right
    [0.1, 0.7, 0.2],    # right
    [0.2, 0.2, 0.6],    # right
    [0.6, 0.3, 0.1],    # wrong: 2 taken for 0
])


def test_metrics_of_a_known_example():
    m = evaluate(Y_TRUE, Y_PROB)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["top3_accuracy"] == 1.0
    # F1 per class: 0 -> p 1/2, r 1/2; 1 -> p 2/3, r 1; 2 -> p 1, r 1/2
    assert m["macro_f1"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))
    expected_loss = -np.mean(np.log([0.9, 0.4, 0.8, 0.7, 0.6, 0.1]))
    assert m["log_loss"] == pytest.approx(expected_loss)


def test_confusion_counts_rows_true_columns_predicted():
    np.testing.assert_array_equal(confusion(Y_TRUE, Y_PROB, 3), [[1, 1, 0], [0, 2, 0], [1, 0, 1]])


def test_per_class_report():
    report = per_class(Y_TRUE, Y_PROB, ["a", "b", "c"])
    assert report["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "support": 2}


def test_calibration_error_is_zero_when_confidence_matches_accuracy():
    y_prob = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(np.array([0, 0, 0, 1]), y_prob) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1, 1, 1, 1]), y_prob) == pytest.approx(0.75)
